"""``optimize_pipeline``: the optimised engine still matches the stock pipeline (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import EngineConfig, StepBatchingEngine
from inference.models import Family
from inference.optimize import optimize_pipeline
from inference.pipelines import load_pipeline, run_stock
from inference.types import GenerationRequest
from tests.support.engine_requests import engine_request

TOLERANCE = 1e-4  # the engine's fast-mode contract (tests/unit/test_engine.py)


def _requests() -> list[GenerationRequest]:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    mix = [(0.5, 8, 7.5), (0.8, 6, 3.0), (1.0, 5, 1.0)]  # the last one has no guidance: one row
    return [
        engine_request(
            request_id=f"opt-{i}",
            model="tiny-sd",
            prompt=f"prompt number {i}",
            image=image,
            seed=7 + i,
            strength=strength,
            steps=steps,
            guidance_scale=guidance,
        )
        for i, (strength, steps, guidance) in enumerate(mix)
    ]


@pytest.fixture(scope="module")
def pipe(tiny_registry):
    torch.set_num_threads(2)
    return load_pipeline(tiny_registry.get("tiny-sd"))  # this module's own copy: optimising mutates it


def test_channels_last_sdpa_engine_matches_stock(pipe):
    requests = _requests()
    expected = {r.request_id: run_stock(pipe, Family.SD, r, 0, output_type="np") for r in requests}

    report = optimize_pipeline(pipe, channels_last=True, sdpa=True)

    assert report["channels_last"] and report["sdpa"] and not report["compile"]
    assert report["attention_processors"] == {"unet": {"AttnProcessor2_0"}, "vae": {"AttnProcessor2_0"}}
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert pipe.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)

    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8), output_type="np")
    for request in requests:
        engine.submit(request)
    outcomes = engine.run_until_idle()
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    for outcome in outcomes:
        got = np.asarray(outcome.result.images[0])
        assert np.abs(got - expected[outcome.request_id]).max() <= TOLERANCE, outcome.request_id


def test_compile_wraps_the_unet_lazily(tiny_registry):
    fresh = load_pipeline(tiny_registry.get("tiny-sd"))
    in_channels = fresh.unet.config.in_channels
    report = optimize_pipeline(fresh, channels_last=False, sdpa=False, compile=True)
    assert report["compile"] == "default"
    assert isinstance(fresh.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert fresh.unet.config.in_channels == in_channels  # attributes still reach the UNet
