"""Previews of images in progress (``inference.previews`` and the engine's use of it).

Contract: a request that asks for previews every k steps gets, per image, the newest preview each
time one is due (never at its last step: the image itself follows); a preview is bounded in size,
costs the request nothing in its results (its images are bit-identical to a run without previews),
and a failing preview never fails a request. The latent → RGB projection is the least-squares fit
of the loaded VAE's own encodings, for every family (FLUX's packed tokens included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import EngineConfig, StepBatchingEngine
from inference.models import Family
from inference.pipelines import load_pipeline
from inference.previews import bounded, calibration_images, fit_projection, project
from inference.tiny import TINY_MODEL_IDS
from tests.support.engine_requests import engine_request

MODEL_IDS = TINY_MODEL_IDS


@pytest.fixture(scope="module")
def pipes(tiny_registry):
    torch.set_num_threads(2)
    return {family: load_pipeline(tiny_registry.get(mid)) for family, mid in MODEL_IDS.items()}


def _source(size: int = 64) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _run(engine: StepBatchingEngine, *requests):
    """Run to the end; (request id → result, request id → previews in arrival order, step stats)."""
    for request in requests:
        engine.submit(request)
    results, previews, stats = {}, {r.request_id: [] for r in requests}, []
    while engine.has_work:
        outcomes, step = engine.step()
        stats += [step] if step is not None else []
        for request in requests:
            previews[request.request_id] += engine.take_previews(request.request_id)
        for outcome in outcomes:
            assert outcome.error is None, outcome.error
            results[outcome.request_id] = outcome.result
    return results, previews, stats


def test_the_fit_recovers_a_known_linear_map():
    pixels = calibration_images(count=6, side=32)
    pooled = torch.nn.functional.adaptive_avg_pool2d(pixels, (4, 4))
    # latents that encode colour linearly (4 channels from 3 colours, plus an offset): the inverse
    # map exists, so the fit must find it and project back to the pooled colours.
    mix = torch.tensor([[0.5, -0.2, 0.1, 0.3], [0.1, 0.6, -0.3, 0.2], [-0.4, 0.1, 0.5, 0.1]])
    latents = torch.einsum("nrhw,rc->nchw", pooled, mix) + 0.25
    projection = fit_projection(latents, pixels)
    assert projection.shape == (5, 3)
    rgb = project(latents, projection).float() / 127.5 - 1
    assert torch.allclose(rgb, pooled.permute(0, 2, 3, 1), atol=0.01)


def test_previews_are_bounded_in_size():
    assert bounded(Image.new("RGB", (1024, 512)), 256).size == (256, 128)
    assert bounded(Image.new("RGB", (64, 96)), 256).size == (64, 96)  # never enlarged


@pytest.mark.parametrize("family", list(MODEL_IDS), ids=lambda f: f.value)
def test_every_family_previews_every_k_steps_without_changing_its_images(pipes, family):
    pipe, model = pipes[family], MODEL_IDS[family]
    common = {"steps": 10, "strength": 0.8, "seed": 3, "num_images": 2}
    plain, _, _ = _run(
        StepBatchingEngine(pipe, family, EngineConfig(), output_type="np"),
        engine_request("plain", model, "a cat", _source(), **common),
        engine_request("unwatched", model, "a dog", _source(), **common),
    )  # the same batch without previews: batching itself moves results within FAST_TOLERANCE
    results, previews, stats = _run(
        StepBatchingEngine(pipe, family, EngineConfig(), output_type="np"),
        engine_request("watched", model, "a cat", _source(), preview_every=3, **common),
        engine_request("unwatched", model, "a dog", _source(), **common),
    )
    for ours, theirs in zip(results["watched"].images, plain["plain"].images, strict=True):
        np.testing.assert_array_equal(ours, theirs)  # previews read the latents, never write them
    got = previews["watched"]
    steps = got[0].steps
    expected = [(index, step) for step in range(3, steps, 3) for index in (0, 1)]
    assert sorted((p.image_index, p.step) for p in got) == sorted(expected)
    assert all(p.image.size == (8, 8) and p.image.mode == "RGB" for p in got)  # the 64² image's latent grid
    assert previews["unwatched"] == []
    assert sum(s.previews for s in stats) == len(got)
    assert all(s.preview_s >= 0 for s in stats)


def test_the_engine_minimum_interval_and_the_vae_method(pipes):
    pipe = pipes[Family.SD]
    config = EngineConfig(preview_method="vae", preview_max_side=32, preview_min_steps=4)
    _, previews, _ = _run(
        StepBatchingEngine(pipe, Family.SD, config),
        engine_request("r", "tiny-sd", "a cat", _source(), steps=10, strength=1.0, seed=1, preview_every=1),
    )
    assert [p.step for p in previews["r"]] == [4, 8]  # asked every step, the engine allows every 4th
    assert all(p.image.size == (32, 32) for p in previews["r"])  # a 64² decode, shrunk to the bound


def test_a_failing_preview_costs_the_request_nothing(pipes, monkeypatch):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig())

    def broken(latents, size):
        raise RuntimeError("preview exploded")

    monkeypatch.setattr(engine.previewer, "render", broken)
    results, previews, _ = _run(
        engine, engine_request("r", "tiny-sd", "a cat", _source(), steps=6, seed=1, preview_every=1)
    )
    assert len(results["r"].images) == 1
    assert previews["r"] == []


@pytest.mark.parametrize(
    ("knob", "value", "message"),
    [
        ("preview_method", "taesd", "preview_method = 'taesd'; choose one of"),
        ("preview_max_side", 8, "preview_max_side = 8 must be in 16..1024"),
        ("preview_min_steps", 0, "preview_min_steps = 0 must be at least 1"),
    ],
)
def test_preview_knobs_are_checked(knob, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{knob: value})
