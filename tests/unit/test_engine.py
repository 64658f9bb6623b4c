"""The step-level batching engine against the stock diffusers pipeline (the oracle), per family.

Contract under test: a request's images equal what the stock pipeline produces for that request
alone (image i with seed s+i), within FAST_TOLERANCE in the default mode and bit for bit in exact
mode, whatever else shares its UNet steps and whenever it arrives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from inference.engine import EngineConfig, StepBatchingEngine
from inference.errors import GenerationError, InvalidInputError, RequestCancelledError
from inference.models import Family
from inference.pipelines import load_pipeline, run_stock
from inference.types import GenerationRequest
from tests.support.engine_requests import engine_request

#: Max |difference| in [0, 1] pixel scale for batched (non-exact) outputs. Measured: ≤ 4e-6, the
#: same size as diffusers' own batching of identical requests; the bound leaves room for other BLAS.
FAST_TOLERANCE = 1e-4

MODEL_IDS = {
    Family.SD: "tiny-sd",
    Family.SDXL: "tiny-sdxl",
    Family.INSTRUCT_PIX2PIX: "tiny-pix2pix",
    Family.SD3: "tiny-sd3",
    Family.FLUX: "tiny-flux",
}

# (strength, steps, guidance, image_guidance): every request different; guidance 1.0 takes one row,
# and for pix2pix image_guidance < 1 also drops guidance (diffusers' own rule).
MIX = [
    (0.3, 10, 3.0, 1.5),
    (0.45, 16, 9.0, 1.0),
    (0.6, 12, 5.5, 2.0),
    (1.0, 8, 1.0, 1.5),
    (0.8, 14, 7.5, 0.5),
]


@pytest.fixture(scope="module")
def pipes(tiny_registry):
    torch.set_num_threads(2)
    return {family: load_pipeline(tiny_registry.get(mid)) for family, mid in MODEL_IDS.items()}


def _source(size: int = 64, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _requests(family: Family, size: int = 64) -> list[GenerationRequest]:
    source = _source(size)
    return [
        engine_request(
            request_id=f"{family.value}-{i}",
            model=MODEL_IDS[family],
            prompt=f"prompt number {i}",
            negative_prompt="blurry" if i % 2 else None,
            prompt_2="second prompt" if i == 2 else None,
            image=source,
            seed=100 + 10 * i,
            strength=strength,
            steps=steps,
            guidance_scale=guidance,
            image_guidance_scale=image_guidance,
            num_images=2 if i == 1 else 1,
        )
        for i, (strength, steps, guidance, image_guidance) in enumerate(MIX)
    ]


def _run_staggered(engine: StepBatchingEngine, requests: list[GenerationRequest]) -> dict[str, list]:
    """Two requests at once, the rest joining one per step while the first ones are mid-flight."""
    outcomes = []
    for request in requests[:2]:
        engine.submit(request)
    for request in requests[2:]:
        outcomes += engine.step()[0]
        engine.submit(request)
    outcomes += engine.run_until_idle()
    assert all(o.error is None for o in outcomes), [o.error for o in outcomes]
    return {o.request_id: list(o.result.images) for o in outcomes}


def assert_neighbours_unchanged(baseline: dict[str, list], outcomes: dict, left: str) -> None:
    """Every request but ``left`` has exactly its ``baseline`` images (``outcomes``: id -> Outcome)."""
    for request_id, images in baseline.items():
        if request_id != left:
            got = outcomes[request_id].result.images
            assert all(np.array_equal(a, b) for a, b in zip(got, images, strict=True)), request_id


def _oracle(pipe, family, requests) -> dict[str, list]:
    return {
        r.request_id: [run_stock(pipe, family, r, i, "np") for i in range(r.num_images)] for r in requests
    }


@pytest.fixture(scope="module")
def oracle_outputs(pipes):
    return {family: _oracle(pipes[family], family, _requests(family)) for family in MODEL_IDS}


@pytest.mark.parametrize("family", list(MODEL_IDS), ids=lambda f: f.value)
@pytest.mark.parametrize("exact", [False, True], ids=["fast", "exact"])
def test_batched_output_equals_stock_pipeline_alone(pipes, oracle_outputs, family, exact):
    engine = StepBatchingEngine(
        pipes[family], family, EngineConfig(max_batch_samples=4, exact=exact), output_type="np"
    )
    got = _run_staggered(engine, _requests(family))
    expected = oracle_outputs[family]
    assert got.keys() == expected.keys()
    for request_id, images in got.items():
        for image, reference in zip(images, expected[request_id], strict=True):
            assert reference.std() > 0.05  # not a degenerate (saturated) output
            if exact:
                assert np.array_equal(image, reference), f"{request_id} differs in exact mode"
            else:
                assert np.abs(image - reference).max() <= FAST_TOLERANCE, request_id


def test_steps_are_shared_across_different_parameters(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=8))
    for request in _requests(Family.SD):
        engine.submit(request)
    batch_sizes = []
    while engine.has_work:
        _, stats = engine.step()
        if stats:
            batch_sizes.append(stats.samples)
    assert max(batch_sizes) == 6  # five requests, one with two images, all in one UNet call


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerDiscreteScheduler"])
def test_vectorised_scheduler_step_is_bitwise_the_per_sample_step(pipes, scheduler):
    import diffusers

    pipe = pipes[Family.SD]
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, scheduler).from_config(original.config)
    try:
        outputs = []
        for vectorise in (True, False):
            engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(vectorise=vectorise), output_type="np")
            outputs.append(_run_staggered(engine, _requests(Family.SD)))
    finally:
        pipe.scheduler = original
    for request_id, images in outputs[0].items():
        assert all(np.array_equal(a, b) for a, b in zip(images, outputs[1][request_id], strict=True))


def test_seeds_reproduce_and_images_of_one_request_differ(pipes):
    request = _requests(Family.SD)[1]  # two images
    runs = []
    for _ in range(2):
        engine = StepBatchingEngine(pipes[Family.SD], Family.SD, output_type="np")
        engine.submit(request)
        (outcome,) = engine.run_until_idle()
        runs.append(outcome.result)
    assert runs[0].seeds == (request.seed, request.seed + 1)
    assert all(np.array_equal(a, b) for a, b in zip(runs[0].images, runs[1].images, strict=True))
    assert not np.array_equal(runs[0].images[0], runs[0].images[1])


#: A UNet family and the two transformer (flow-matching) families, for the fault tests.
FAULT_FAMILIES = [Family.SD, Family.SD3, Family.FLUX]


@pytest.mark.parametrize("family", FAULT_FAMILIES, ids=lambda f: f.value)
def test_cancel_mid_flight_frees_the_slot_and_leaves_the_others_unchanged(pipes, family):
    requests = _requests(family)
    config = EngineConfig(max_batch_samples=4, exact=True)
    baseline = _run_staggered(StepBatchingEngine(pipes[family], family, config, output_type="np"), requests)

    engine = StepBatchingEngine(pipes[family], family, config, output_type="np")
    for request in requests:
        engine.submit(request)
    outcomes = engine.step()[0] + engine.step()[0]
    victim = requests[1].request_id
    assert engine.progress(victim).steps_done == 4  # two images, two steps each
    before = engine.active_samples
    engine.cancel(victim)
    outcomes += engine.step()[0]
    assert engine.active_samples == before - 2 or engine.active_samples < before
    assert engine.progress(victim) is None
    outcomes += engine.run_until_idle()
    by_id = {o.request_id: o for o in outcomes}
    assert isinstance(by_id[victim].error, RequestCancelledError)
    assert_neighbours_unchanged(baseline, by_id, victim)


def test_cancel_before_admission_never_runs(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=1))
    first, second = _requests(Family.SD)[:2]
    engine.submit(first)
    engine.submit(second)
    engine.step()
    engine.cancel(second.request_id)
    outcomes = engine.run_until_idle()
    by_id = {o.request_id: o for o in outcomes}
    assert isinstance(by_id[second.request_id].error, RequestCancelledError)
    assert by_id[first.request_id].result is not None


def test_progress_counts_unet_steps_with_diffusers_strength_truncation(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD)
    source = _source()
    # int(50 * 0.29) == 14 in Python float arithmetic; diffusers runs 14 steps, not round(14.5).
    request = engine_request("trunc", "tiny-sd", "p", source, seed=1, strength=0.29, steps=50)
    engine.submit(request)
    engine.step()
    assert engine.progress("trunc").steps_total == int(50 * 0.29) == 14
    assert engine.progress("trunc").steps_done == 1
    (outcome,) = engine.run_until_idle()
    assert outcome.result.unet_steps == 14


def test_strength_below_one_step_runs_one_step_with_a_warning(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD)
    engine.submit(engine_request("tiny-strength", "tiny-sd", "p", _source(), seed=1, strength=0.01, steps=20))
    (outcome,) = engine.run_until_idle()
    assert outcome.result.unet_steps == 1
    assert outcome.result.warnings


@pytest.mark.parametrize("family", FAULT_FAMILIES, ids=lambda f: f.value)
def test_a_request_that_breaks_the_denoiser_fails_alone(pipes, monkeypatch, family):
    pipe = pipes[family]
    requests = _requests(family)
    config = EngineConfig(max_batch_samples=8, exact=True)
    baseline = _run_staggered(StepBatchingEngine(pipe, family, config, output_type="np"), requests)

    engine = StepBatchingEngine(pipe, family, config, output_type="np")
    poisoned = requests[2].request_id
    adapter_start = engine._adapter.start_latents

    def start_latents(pipe_, cond, scheduler, timesteps, generator):
        latents = adapter_start(pipe_, cond, scheduler, timesteps, generator)
        return latents * float("nan") if cond.encoder_hidden_states is poison_marker[0] else latents

    poison_marker = [None]
    real_condition = engine._adapter.encode_prompt

    def condition(pipe_, request):
        cond = real_condition(pipe_, request)
        if request.request_id == poisoned:
            poison_marker[0] = cond.encoder_hidden_states
        return cond

    denoiser = engine._adapter.denoiser(pipe)
    real_forward = denoiser.forward

    def forward(*args, **kwargs):
        latents = args[0] if args else kwargs["hidden_states"]
        if torch.isnan(latents).any():
            raise RuntimeError("NaN input")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(engine._adapter, "start_latents", start_latents)
    monkeypatch.setattr(engine._adapter, "encode_prompt", condition)
    monkeypatch.setattr(denoiser, "forward", forward)
    for request in requests:
        engine.submit(request)
    outcomes = {o.request_id: o for o in engine.run_until_idle()}
    assert isinstance(outcomes[poisoned].error, GenerationError)
    assert_neighbours_unchanged(baseline, outcomes, poisoned)


def test_a_request_that_fails_admission_fails_alone(pipes, monkeypatch):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD)
    real_condition = engine._adapter.encode_prompt

    def condition(pipe_, request):
        if request.prompt == "prompt number 3":
            raise RuntimeError("tokenizer exploded")
        return real_condition(pipe_, request)

    monkeypatch.setattr(engine._adapter, "encode_prompt", condition)
    for request in _requests(Family.SD):
        engine.submit(request)
    outcomes = {o.request_id: o for o in engine.run_until_idle()}
    assert isinstance(outcomes["sd-3"].error, GenerationError)
    assert sum(o.result is not None for o in outcomes.values()) == 4


def test_size_not_a_multiple_of_8_is_refused_at_submit(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD)
    with pytest.raises(InvalidInputError):
        engine.submit(engine_request("odd", "tiny-sd", "p", _source(60), seed=1))


def test_buckets_by_latent_size_and_row_area_cap(pipes):
    area_64 = (64 // 8) ** 2
    # Room for 2 two-row samples of 64x64 per call, whatever max_batch_samples says.
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_row_area=4 * area_64))
    small = [engine_request(f"s{i}", "tiny-sd", "p", _source(64, i), seed=i, steps=10) for i in range(3)]
    large = [engine_request(f"l{i}", "tiny-sd", "p", _source(96, i), seed=i, steps=10) for i in range(2)]
    for request in small + large:
        engine.submit(request)
    seen = {}
    outcomes = []
    while engine.has_work:
        step_outcomes, stats = engine.step()
        outcomes += step_outcomes
        if stats:
            seen.setdefault(stats.bucket, set()).add(stats.samples)
            assert (
                stats.rows * (stats.bucket[0] // 8) * (stats.bucket[1] // 8) <= 4 * area_64
                or stats.samples == 1
            )
    assert set(seen) == {(64, 64), (96, 96)}
    assert max(seen[(64, 64)]) == 2
    assert {o.request_id: o.result.width for o in outcomes} == {
        "s0": 64,
        "s1": 64,
        "s2": 64,
        "l0": 96,
        "l1": 96,
    }


def test_fair_admission_lets_a_quiet_tenant_in_before_a_noisy_backlog(pipes):
    engine = StepBatchingEngine(
        pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=2, admission="fair")
    )
    for i in range(6):
        engine.submit(
            engine_request(f"noisy-{i}", "tiny-sd", "p", _source(), seed=i, steps=4, tenant="noisy")
        )
    engine.step()
    engine.submit(engine_request("quiet", "tiny-sd", "p", _source(), seed=9, steps=4, tenant="quiet"))
    finished = [o.request_id for o in engine.run_until_idle()]
    assert finished.index("quiet") < finished.index("noisy-3")


def test_reconfigure_changes_the_cap_for_later_admissions(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=1))
    for i in range(4):
        engine.submit(engine_request(f"r{i}", "tiny-sd", "p", _source(), seed=i, steps=10))
    assert engine.step()[1].samples == 1
    engine.reconfigure(EngineConfig(max_batch_samples=4))
    assert engine.step()[1].samples == 4


def test_duplicate_request_id_in_flight_is_refused(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD)
    request = engine_request("dup", "tiny-sd", "p", _source(), seed=1, steps=4)
    engine.submit(request)
    engine.submit(request)
    outcomes = engine.run_until_idle()
    assert sorted(o.error is None for o in outcomes) == [False, True]


def _quiet_latencies(engine: StepBatchingEngine, noisy: int, quiet_every: int) -> list[int]:
    """Steps from submission to completion of a quiet tenant's requests during a flood from another."""
    source = _source()
    for i in range(noisy):
        engine.submit(engine_request(f"n{i}", "tiny-sd", "p", source, seed=i, steps=10, tenant="noisy"))
    submitted, latencies, step = {}, [], 0
    while engine.has_work:
        if step % quiet_every == 0 and len(submitted) < 4:
            request_id = f"q{len(submitted)}"
            engine.submit(
                engine_request(request_id, "tiny-sd", "p", source, seed=99, steps=10, tenant="quiet")
            )
            submitted[request_id] = step
        outcomes, _ = engine.step()
        step += 1
        latencies += [step - submitted[o.request_id] for o in outcomes if o.request_id in submitted]
    return latencies


def test_fair_admission_bounds_a_quiet_tenants_latency_under_a_10x_flood(pipes):
    """40 requests from one tenant at once, 4 spaced out from another (10x the traffic), cap 4.

    Alone, a request of 10 steps at strength 0.8 takes 8 UNet steps. Under fair admission the quiet
    tenant's worst case stays within 2x that (it waits at most for one slot to free up); under FIFO it
    waits behind the flood.
    """
    latencies = {}
    for policy in ("fifo", "fair"):
        engine = StepBatchingEngine(
            pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=4, admission=policy)
        )
        latencies[policy] = _quiet_latencies(engine, noisy=40, quiet_every=12)
    assert len(latencies["fair"]) == len(latencies["fifo"]) == 4
    assert max(latencies["fair"]) <= 16, latencies
    assert max(latencies["fifo"]) >= 48, latencies


def test_a_higher_lane_is_admitted_first(pipes):
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=1))
    for i in range(3):
        engine.submit(engine_request(f"low-{i}", "tiny-sd", "p", _source(), seed=i, steps=4, priority=2))
    engine.step()  # low-0 is running; the others wait
    engine.submit(engine_request("normal", "tiny-sd", "p", _source(), seed=7, steps=4, priority=1))
    engine.submit(engine_request("high", "tiny-sd", "p", _source(), seed=8, steps=4, priority=0))
    finished = [o.request_id for o in engine.run_until_idle()]
    assert finished == ["low-0", "high", "normal", "low-1", "low-2"]


def test_queue_position_and_eta_match_a_run_we_control(pipes):
    """Three identical requests, one sample per step: the engine's positions are the real order, and
    its ETA for the last one is the number of steps that run then took, at the measured step time
    (counted in steps, so a busy machine's timing noise does not decide the test)."""
    engine = StepBatchingEngine(pipes[Family.SD], Family.SD, EngineConfig(max_batch_samples=1))
    for name in ("a", "b", "c"):
        engine.submit(engine_request(name, "tiny-sd", "p", _source(), seed=1, steps=10, strength=1.0))
    for _ in range(3):  # a runs; the engine measures its step time
        engine.step()
    positions = [engine.progress(name).queue_position for name in ("a", "b", "c")]
    assert positions == [None, 0, 1]
    progress = engine.progress("c")
    eta_steps = progress.eta_s / engine._step_s[(64, 64)]
    steps, finished = 0, []
    while engine.has_work:
        outcomes, _ = engine.step()
        steps += 1
        finished += [outcome.request_id for outcome in outcomes]
    assert finished == ["a", "b", "c"]
    assert abs(eta_steps - steps) <= 0.1 * steps + 1, (eta_steps, steps)
