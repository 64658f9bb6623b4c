"""Accelerator out-of-memory errors, injected on CPU: the batch splits, the bucket's cap drops for a
while, and a request fails alone only when even one of its images does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.engine import EngineConfig, StepBatchingEngine
from inference.errors import GenerationError
from inference.memory import BucketCaps, is_out_of_memory
from inference.models import Family
from inference.pipelines import load_pipeline
from tests.support.engine_requests import engine_request
from tests.unit.test_engine import FAST_TOLERANCE, _requests, _run_staggered, _source


@pytest.fixture(scope="module")
def pipe(tiny_registry):
    torch.set_num_threads(2)
    return load_pipeline(tiny_registry.get("tiny-sd"))


def _oom_above(pipe, monkeypatch, max_rows: int, never_fits_side: int | None = None) -> list[int]:
    """Make the UNet raise CUDA's out-of-memory error above ``max_rows`` rows (and always for
    latents of ``never_fits_side``); returns the row counts of the calls that ran."""
    ran: list[int] = []
    real_forward = pipe.unet.forward

    def forward(sample, *args, **kwargs):
        if sample.shape[0] > max_rows or sample.shape[-1] == never_fits_side:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        ran.append(sample.shape[0])
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", forward)
    return ran


def test_an_oom_splits_the_batch_and_every_request_still_matches(pipe, monkeypatch):
    requests = _requests(Family.SD)
    config = EngineConfig(max_batch_samples=8)
    baseline = _run_staggered(StepBatchingEngine(pipe, Family.SD, config, output_type="np"), requests)
    ran = _oom_above(pipe, monkeypatch, max_rows=4)
    engine = StepBatchingEngine(pipe, Family.SD, config, output_type="np")
    for request in requests:
        engine.submit(request)
    outcomes, splits, caps_seen = [], 0, []
    while engine.has_work:
        step_outcomes, stats = engine.step()
        outcomes += step_outcomes
        if stats:
            splits += stats.oom_splits
            caps_seen.append(engine.effective_caps().get(stats.bucket))
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    assert splits >= 1 and max(ran) <= 4
    assert 2 in caps_seen  # three samples (6 rows) failed: capped at 2 (the larger half)
    for outcome in outcomes:
        for image, reference in zip(outcome.result.images, baseline[outcome.request_id], strict=True):
            assert np.abs(image - reference).max() <= FAST_TOLERANCE


def test_a_request_that_does_not_fit_even_alone_fails_alone(pipe, monkeypatch):
    _oom_above(pipe, monkeypatch, max_rows=64, never_fits_side=96 // 8)
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8))
    small = [engine_request(f"s{i}", "tiny-sd", "p", _source(64, i), seed=i, steps=6) for i in range(3)]
    huge = engine_request("huge", "tiny-sd", "p", _source(96), seed=1, steps=6)
    for request in [*small, huge]:
        engine.submit(request)
    by_id = {o.request_id: o for o in engine.run_until_idle()}
    assert isinstance(by_id["huge"].error, GenerationError)
    assert by_id["huge"].error.code == "out_of_memory"
    assert "does not fit even alone" in by_id["huge"].error.message
    assert all(by_id[r.request_id].result is not None for r in small)


def test_an_oom_in_vae_decode_splits_the_decode(pipe, monkeypatch):
    real_decode = pipe.vae.decode
    decoded: list[int] = []

    def decode(latents, *args, **kwargs):
        if latents.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        decoded.append(latents.shape[0])
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8))
    for i in range(3):
        engine.submit(engine_request(f"d{i}", "tiny-sd", "p", _source(), seed=i, steps=4))
    outcomes = engine.run_until_idle()
    assert all(o.error is None for o in outcomes) and len(outcomes) == 3
    assert decoded == [1, 1, 1]


def test_lowered_caps_expire_after_the_cooldown():
    now = [0.0]
    caps = BucketCaps(cooldown_s=60, clock=lambda: now[0])
    assert caps.lower((64, 64), 8) == 4
    assert caps.lower((64, 64), 3) == 2
    assert caps.cap((64, 64)) == 2 and caps.snapshot() == {(64, 64): 2}
    now[0] = 59.9
    assert caps.cap((64, 64)) == 2
    now[0] = 60.0
    assert caps.cap((64, 64)) is None and caps.snapshot() == {}


def test_out_of_memory_is_recognised_on_every_device():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
