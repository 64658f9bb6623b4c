"""The engine in float16 and bfloat16, every family, against the stock pipeline in the same dtype.

The shipped GPU config serves float16; torch 2.13 runs half precision on CPU, so CI tests it.

What "equal to stock" means in half precision:
- **exact mode** is bit for bit the stock pipeline in the same dtype (on CPU): per-sample
  scheduler steps (the stock step's own arithmetic), batch-variant GEMMs per sample, one-row
  samples alone, one VAE encode per request.
- **fast mode** (the default) batches and steps DDIM/Euler vectorised in float32, rounded once per
  step. Batched GEMMs and the different rounding change the low bits, and 8+ denoising steps of a
  random-weight model amplify them, so the bound is set against the *noise floor*: how far the stock
  pipeline in that dtype is from itself in float32, measured here on the same requests. Measured on
  this CPU (max |Δ|, pixels in [0, 1]): floor fp16 3.9e-3..1.1e-2, bf16 4.0e-2..9.4e-2; the engine
  vs float32 0.66-1.23x the floor (it is as close to the float32 result as stock half precision
  is), the engine vs stock 0.9-1.6x. The contract: engine vs float32 ≤ 1.5x floor; then by the
  triangle inequality engine vs stock ≤ (1.5 + 1)x floor. A wrong guidance formula or a dtype slip
  is far beyond either (≥ 0.3).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from inference.engine import EngineConfig, StepBatchingEngine
from inference.errors import RequestCancelledError
from inference.models import Family
from inference.pipelines import load_pipeline
from tests.unit.test_engine import (
    MODEL_IDS,
    _oracle,
    _requests,
    _run_staggered,
    assert_neighbours_unchanged,
)

HALF_DTYPES = ("float16", "bfloat16")
#: Every (family, dtype) pair the engine is tested in: float32 by tests/unit/test_engine.py, the half
#: dtypes here. tests/unit/test_shipped_dtypes.py refuses a shipped config naming any other pair.
TESTED_DTYPES = frozenset((f.value, d) for f in MODEL_IDS for d in ("float32", *HALF_DTYPES))
#: The largest fp16-vs-fp32 / bf16-vs-fp32 stock deviation that still counts as rounding noise.
FLOOR_CEILING = {"float16": 0.02, "bfloat16": 0.15}
ENGINE_VS_FLOAT32 = 1.5  # x the noise floor
ENGINE_VS_STOCK = ENGINE_VS_FLOAT32 + 1  # |e - s| <= |e - f| + |f - s|

CASES = [(family, dtype) for family in MODEL_IDS for dtype in HALF_DTYPES]


def _max_dev(got: dict[str, list], expected: dict[str, list]) -> float:
    assert got.keys() == expected.keys()
    return max(float(np.abs(a - b).max()) for k in got for a, b in zip(got[k], expected[k], strict=True))


@pytest.fixture(scope="module")
def loaded(tiny_registry):
    """(family, dtype) -> pipeline, loaded once per module through the real ``from_pretrained`` path."""
    torch.set_num_threads(2)
    cache: dict[tuple[Family, str], object] = {}

    def get(family: Family, dtype: str):
        if (family, dtype) not in cache:
            spec = dataclasses.replace(tiny_registry.get(MODEL_IDS[family]), dtype=dtype)
            cache[(family, dtype)] = load_pipeline(spec)
        return cache[(family, dtype)]

    return get


@pytest.fixture(scope="module")
def oracles(loaded):
    """(family, dtype) -> the stock pipeline's outputs for the mixed requests, each image alone."""
    cache: dict[tuple[Family, str], dict] = {}

    def get(family: Family, dtype: str) -> dict:
        if (family, dtype) not in cache:
            cache[(family, dtype)] = _oracle(loaded(family, dtype), family, _requests(family))
        return cache[(family, dtype)]

    return get


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=lambda v: getattr(v, "value", v))
def test_fast_mode_is_within_the_noise_floor_of_stock(loaded, oracles, family, dtype):
    """Staggered arrivals, mixed strength/steps/guidance, one- and multi-row samples, two images."""
    pipe = loaded(family, dtype)
    engine = StepBatchingEngine(pipe, family, EngineConfig(max_batch_samples=4), output_type="np")
    got = _run_staggered(engine, _requests(family))
    stock, stock32 = oracles(family, dtype), oracles(family, "float32")
    floor = _max_dev(stock, stock32)
    vs_stock, vs_float32 = _max_dev(got, stock), _max_dev(got, stock32)
    print(
        f"{family.value} {dtype}: noise floor {floor:.2e}, engine vs stock {vs_stock:.2e} "
        f"({vs_stock / floor:.2f}x), engine vs float32 {vs_float32:.2e} ({vs_float32 / floor:.2f}x)"
    )
    assert 0 < floor <= FLOOR_CEILING[dtype], "the stock half-precision run itself is off"
    assert vs_stock <= ENGINE_VS_STOCK * floor
    assert vs_float32 <= ENGINE_VS_FLOAT32 * floor
    for images in got.values():
        for image in images:
            assert np.isfinite(image).all() and image.std() > 0.05


@pytest.mark.parametrize(("family", "dtype"), CASES, ids=lambda v: getattr(v, "value", v))
def test_exact_mode_is_bitwise_stock_in_the_same_dtype(loaded, oracles, family, dtype):
    engine = StepBatchingEngine(
        loaded(family, dtype), family, EngineConfig(max_batch_samples=4, exact=True), output_type="np"
    )
    got = _run_staggered(engine, _requests(family))
    expected = oracles(family, dtype)
    for request_id, images in got.items():
        for image, reference in zip(images, expected[request_id], strict=True):
            assert np.array_equal(image, reference), f"{request_id} differs from stock {dtype}"


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_cancel_in_half_precision_leaves_the_neighbours_bitwise_unchanged(loaded, dtype):
    pipe, requests = loaded(Family.SD, dtype), _requests(Family.SD)
    config = EngineConfig(max_batch_samples=8, exact=True)
    baseline = _run_staggered(StepBatchingEngine(pipe, Family.SD, config, output_type="np"), requests)
    engine = StepBatchingEngine(pipe, Family.SD, config, output_type="np")
    for request in requests:
        engine.submit(request)
    outcomes = engine.step()[0] + engine.step()[0]
    victim = requests[2].request_id
    engine.cancel(victim)
    outcomes += engine.run_until_idle()
    by_id = {o.request_id: o for o in outcomes}
    assert isinstance(by_id[victim].error, RequestCancelledError)
    assert_neighbours_unchanged(baseline, by_id, victim)


@pytest.mark.parametrize("force_upcast", [True, False], ids=["force_upcast", "fp16_vae"])
def test_sdxl_vae_upcast_behaves_as_stock(tiny_registry, force_upcast):
    """Stock SDXL casts its VAE to float32 around encode and (float16 only) decode when the VAE
    config says ``force_upcast``, then back; without it the VAE runs in float16. The engine computes
    the same (bit for bit in exact mode) with a float32 copy made once, and never recasts the
    pipeline's own VAE."""
    spec = dataclasses.replace(tiny_registry.get(MODEL_IDS[Family.SDXL]), dtype="float16")
    pipe = load_pipeline(spec)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    requests = _requests(Family.SDXL)[:3]
    expected = _oracle(pipe, Family.SDXL, requests)
    weights = {name: p.data_ptr() for name, p in pipe.vae.named_parameters()}  # a cast replaces them
    engine = StepBatchingEngine(
        pipe, Family.SDXL, EngineConfig(max_batch_samples=4, exact=True), output_type="np"
    )
    got = _run_staggered(engine, requests)
    assert _max_dev(got, expected) == 0.0
    assert pipe.vae.dtype == torch.float16
    assert weights == {name: p.data_ptr() for name, p in pipe.vae.named_parameters()}
