"""Bounded UNet shapes (row buckets, warm-up, compile) and batched VAE encodes in the engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.engine import EngineConfig, StepBatchingEngine
from inference.engine_config import OptimizeConfig
from inference.models import Family
from inference.optimize import apply_optimize_config
from inference.pipelines import load_pipeline
from tests.unit.test_engine import FAST_TOLERANCE, MODEL_IDS, _oracle, _requests, _run_staggered

BUCKETS = (2, 4, 8)
#: ``optimize.compile`` modes a test runs (besides ``off``, which every engine test runs); a shipped
#: config naming another fails tests/unit/test_shipped_dtypes.py. ``max-autotune`` and
#: ``reduce-overhead`` (CUDA graphs) are GPU modes: they are for the GPU check to measure first.
TESTED_COMPILE_MODES = ("default",)


@pytest.fixture(scope="module")
def pipes(tiny_registry):
    torch.set_num_threads(2)
    return {family: load_pipeline(tiny_registry.get(mid)) for family, mid in MODEL_IDS.items()}


def _record_unet_rows(pipe, monkeypatch) -> list[int]:
    """The row count of every denoiser call from now on (UNet or transformer)."""
    rows: list[int] = []
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    real_forward = denoiser.forward

    def forward(*args, **kwargs):
        rows.append((args[0] if args else kwargs["hidden_states"]).shape[0])
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(denoiser, "forward", forward)
    return rows


@pytest.mark.parametrize("family", list(MODEL_IDS), ids=lambda f: f.value)
def test_padding_to_row_buckets_keeps_outputs_and_bounds_the_shapes(pipes, family, monkeypatch):
    """Every UNet call takes a bucket's row count; outputs equal the unpadded run's (within the fast
    tolerance: padding changes only the GEMMs' row count M) and still match stock."""
    pipe, requests = pipes[family], _requests(family)
    config = EngineConfig(max_batch_samples=4)
    unpadded = _run_staggered(StepBatchingEngine(pipe, family, config, output_type="np"), requests)
    rows = _record_unet_rows(pipe, monkeypatch)
    engine = StepBatchingEngine(
        pipe, family, config, optimize=OptimizeConfig(row_buckets=BUCKETS), output_type="np"
    )
    padded = _run_staggered(engine, requests)
    assert set(rows) <= set(BUCKETS), sorted(set(rows))
    deviation = max(
        float(np.abs(a - b).max()) for k in padded for a, b in zip(padded[k], unpadded[k], strict=True)
    )
    print(f"{family.value}: padded vs unpadded max |Δ| {deviation:.2e}; UNet rows seen {sorted(set(rows))}")
    assert deviation <= FAST_TOLERANCE
    expected = _oracle(pipe, family, requests)
    for request_id, images in padded.items():
        for image, reference in zip(images, expected[request_id], strict=True):
            assert np.abs(image - reference).max() <= FAST_TOLERANCE


def test_a_call_never_takes_more_rows_than_the_largest_bucket(pipes, monkeypatch):
    pipe = pipes[Family.SD]
    rows = _record_unet_rows(pipe, monkeypatch)
    engine = StepBatchingEngine(
        pipe, Family.SD, EngineConfig(max_batch_samples=8), optimize=OptimizeConfig(row_buckets=(2, 4))
    )
    for request in _requests(Family.SD):  # six samples of up to two rows each: 11 rows in all
        engine.submit(request)
    seen_samples = []
    while engine.has_work:
        _, stats = engine.step()
        if stats:
            seen_samples.append(stats.samples)
    assert max(rows) == 4 and set(rows) <= {2, 4}
    assert max(seen_samples) >= 2


def test_warm_up_runs_every_bucket_and_size_and_reports_progress(pipes, monkeypatch):
    pipe = pipes[Family.SDXL]
    rows = _record_unet_rows(pipe, monkeypatch)
    optimize = OptimizeConfig(row_buckets=(1, 3), warmup_sizes=((64, 64), (64, 96)))
    engine = StepBatchingEngine(pipe, Family.SDXL, optimize=optimize)
    progress: list[tuple[int, int]] = []
    assert engine.warm_up(lambda done, total: progress.append((done, total))) == 4
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert rows == [1, 3, 1, 3]
    assert not engine.has_work and engine.active_samples == 0


@pytest.mark.parametrize("mode", TESTED_COMPILE_MODES)
def test_compiled_unet_warmed_up_serves_requests_without_compiling(tiny_registry, mode):
    """One shape (the CI budget: the tiny UNet's first compile takes about a minute on this CPU)."""
    pipe = load_pipeline(tiny_registry.get(MODEL_IDS[Family.SD]))  # compiling mutates: own copy
    requests = [r for r in _requests(Family.SD) if r.guidance_scale > 1][:2]  # two rows each
    expected = _oracle(pipe, Family.SD, requests)
    optimize = OptimizeConfig(compile=mode, row_buckets=(4,), warmup_sizes=((64, 64),))
    report = apply_optimize_config(pipe, optimize)
    assert report["compile"] == mode
    engine = StepBatchingEngine(
        pipe, Family.SD, EngineConfig(max_batch_samples=2), optimize=optimize, output_type="np"
    )
    assert engine.warm_up() == 1
    from torch._dynamo.utils import counters

    compiled_before = counters["stats"]["unique_graphs"]
    got = _run_staggered(engine, requests)
    assert counters["stats"]["unique_graphs"] == compiled_before, "a request triggered a compile"
    for request_id, images in got.items():
        for image, reference in zip(images, expected[request_id], strict=True):
            assert np.abs(image - reference).max() <= 1e-3  # inductor's fused kernels round differently


def _record_vae_encodes(pipe, monkeypatch) -> list[int]:
    """The batch size of every VAE encode from now on (the patch ends with the test)."""
    calls: list[int] = []
    real_encode = pipe.vae.encode
    monkeypatch.setattr(
        pipe.vae, "encode", lambda x, *a, **k: calls.append(x.shape[0]) or real_encode(x, *a, **k)
    )
    return calls


def test_requests_admitted_together_share_one_vae_encode(pipes, monkeypatch):
    pipe = pipes[Family.SD]
    calls = _record_vae_encodes(pipe, monkeypatch)
    requests = _requests(Family.SD)
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8), output_type="np")
    for request in requests:
        engine.submit(request)
    got = {o.request_id: list(o.result.images) for o in engine.run_until_idle()}
    assert calls == [len(requests)]  # five requests (six samples), one encode
    expected = _oracle(pipe, Family.SD, requests)
    for request_id, images in got.items():
        for image, reference in zip(images, expected[request_id], strict=True):
            assert np.abs(image - reference).max() <= FAST_TOLERANCE


def test_exact_mode_encodes_each_request_alone(pipes, monkeypatch):
    pipe = pipes[Family.SD]
    calls = _record_vae_encodes(pipe, monkeypatch)
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8, exact=True))
    for request in _requests(Family.SD):
        engine.submit(request)
    engine.run_until_idle()
    assert calls == [1] * 5
