"""Step-level batching vs the stock pipeline: throughput and latency, measured side by side.

What it measures, on a tiny random-weight model on CPU (``--family``: ``sd``, DDIM, the default;
``flux`` or ``sd3``, flow matching, image sides multiples of 16), for each image size:

- (a) the stock diffusers img2img pipeline, one request at a time;
- (b) request-level batching: the oldest arrived request plus up to 7 more arrived requests with the
  same (strength, steps, guidance) -- every parameter the stock call takes as a scalar (FLUX has no
  negative prompt and no CFG rows, but its distilled guidance is still one scalar per call) -- in ONE
  stock pipeline call with one generator per request (what ``@serve.batch`` over a stock pipeline can
  do at best);
- (c) ``StepBatchingEngine`` with ``max_batch_samples=8`` (fast mode) and, for ``sd`` only, (c-exact)
  with ``exact=True`` (on ``flux`` / ``sd3`` an exact sample runs alone in every transformer call, so
  there is no batching to measure).

under two arrival patterns: all requests at t=0, and an open-loop Poisson stream at rate λ simulated on
the wall clock (each server loop only sees requests whose arrival time has passed; latency is completion
minus arrival). Methods are interleaved across repetitions and medians are reported.

Why: the engine exists because requests with different parameters cannot share a stock pipeline call,
so (b) rarely forms batches on a diverse mix while (c) shares every UNet call. The research prototype
(shared/research/step-level-batching.md, section 4) measured, on the diverse mix with all requests at
t=0: (c)/(b) = 2.15x at 64 px and 1.56x at 128 px ((c)/(a) = 2.81x / 2.08x); with Poisson arrivals (c)
kept p95 latency at a half to a quarter of (a) and (b). Compare the ratios, not the absolute figures:
the tiny model here is not the prototype's (narrower VAE, fewer attention heads) and the machine is shared.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_batching.py [--family sd|flux|sd3] [--quick] \
        [--json out.json]

The ``sd`` figures above are for ``sd``; ``flux`` and ``sd3`` have their own default Poisson rates
(``FAMILY_RATES``), set from what (a) sustains for each tiny model on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from inference.engine import EngineConfig, StepBatchingEngine
from inference.models import SIZE_MULTIPLES, Family, ModelSpec
from inference.pipelines import load_pipeline, stock_kwargs
from inference.tiny import TINY_MODEL_IDS, ensure_tiny_models, tiny_model_specs
from inference.types import GenerationRequest

REPO_ROOT = Path(__file__).resolve().parents[1]
MIXES = {  # strength x steps x guidance
    "diverse": ((0.3, 0.5, 0.75, 1.0), (10, 20, 30), (3.0, 5.0, 7.5, 9.0)),
    "low": ((0.5, 0.8), (20, 30), (5.0, 7.5)),
}
PROMPTS = ("a cat on a sofa", "the dog in the park", "an oil painting of a harbour", "city at night, rain")
NEGATIVE_PROMPTS = ("blurry", "low quality", "text, watermark")
# About 1.3x and 2x what (a) sustains with this tiny model on 2 cores (4.5 img/s at 64 px, 2.5 at 128 px),
# and under what (c) sustains: loaded, not hopeless. (The prototype's model was ~2x faster: 12/20 and 8/12.)
DEFAULT_RATES = {64: (6.0, 10.0), 128: (3.0, 5.0)}
# Per family. The tiny FLUX / SD3 models are faster and batch less: (a) sustains ~10 img/s at 64 px and
# ~8 at 128 px on 2 cores, (c) only 1.2-1.5x that at t=0, so their rates are ~0.9x and ~1.3x of (a).
FAMILY_RATES: dict[Family, dict[int, tuple[float, ...]]] = {
    Family.SD: DEFAULT_RATES,
    Family.FLUX: {64: (9.0, 13.0), 128: (7.0, 10.0)},
    Family.SD3: {64: (9.0, 13.0), 128: (7.0, 10.0)},
}
FAMILIES = (Family.SD, Family.FLUX, Family.SD3)
CAP = 8
METHODS = ("a", "b", "c", "c-exact")
RATIOS = (("b", "a"), ("c", "a"), ("c", "b"), ("c-exact", "b"))
# Per-request arguments of the stock call (a list in a batched call); every other one is a scalar.
PER_REQUEST_KWARGS = frozenset(
    {"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "image", "generator"}
)


def family_methods(family: Family) -> tuple[str, ...]:
    """(c-exact) only for ``sd``: on flux / sd3 exact samples never share a transformer call."""
    return METHODS if family is Family.SD else tuple(m for m in METHODS if m != "c-exact")


@dataclass(frozen=True)
class Job:
    request: GenerationRequest
    arrival: float  # seconds after the start of the run

    @property
    def key(self) -> tuple[float, int, float, int, int]:
        """The stock call's scalars that vary per request (``stock_call`` checks there are no others)."""
        r = self.request
        return (r.strength, r.steps, r.guidance_scale, r.width, r.height)


@dataclass
class Run:
    """What one server loop did: when each request finished, and the batch size of each model call."""

    finished: dict[str, float] = field(default_factory=dict)
    images: int = 0
    batches: list[int] = field(default_factory=list)


# ---- workload ----------------------------------------------------------------------------------------


def make_requests(
    count: int, size: int, mix: str, seed: int, family: Family = Family.SD
) -> list[GenerationRequest]:
    """``count`` requests for ``family``'s tiny model with parameters drawn from ``mix``, distinct
    seeds, one source image (FLUX ignores the negative prompt: it is left unset there)."""
    rng = random.Random(seed)
    pixels = np.random.default_rng(seed + size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    strengths, steps, guidances = MIXES[mix]
    return [
        GenerationRequest(
            request_id=f"{size}-{i}",
            model=TINY_MODEL_IDS[family],
            prompt=rng.choice(PROMPTS),
            negative_prompt=None if family is Family.FLUX else rng.choice(NEGATIVE_PROMPTS),
            image=image,
            seed=seed * 10_000 + i,
            strength=rng.choice(strengths),
            steps=rng.choice(steps),
            guidance_scale=rng.choice(guidances),
            image_guidance_scale=1.5,
        )
        for i in range(count)
    ]


def arrival_times(count: int, rate: float | None, seed: int) -> list[float]:
    """All at t=0 (``rate`` None), else a Poisson process at ``rate`` per second starting at t=0."""
    if rate is None:
        return [0.0] * count
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(count - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times


def sample_steps(requests: list[GenerationRequest]) -> int:
    """UNet sample-steps the workload needs (diffusers' ``int(steps * strength)`` per request)."""
    return sum(max(int(r.steps * r.strength), 1) for r in requests)


# ---- the servers -------------------------------------------------------------------------------------


class Clock:
    """Seconds since the run started; sleeping until a future arrival."""

    def __init__(self) -> None:
        self._start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._start

    def wait_until(self, t: float) -> None:
        time.sleep(max(0.0, t - self.now()))


def _check_images(images: list, jobs: list[Job]) -> None:
    for image, job in zip(images, jobs, strict=True):
        if image.size != (job.request.width, job.request.height):
            raise AssertionError(f"{job.request.request_id}: got a {image.size} image")


def batched_kwargs(family: Family, jobs: list[Job]) -> dict:
    """The stock call for ``jobs`` in one go: ``stock_kwargs`` of each, per-request arguments as lists
    (None when unset for all), scalars shared (an error if the jobs disagree on one)."""
    each = [stock_kwargs(family, j.request, 0) for j in jobs]
    kwargs = {}
    for name in each[0]:
        values = [kw[name] for kw in each]
        if name in PER_REQUEST_KWARGS:
            kwargs[name] = None if all(v is None for v in values) else values
        elif any(v != values[0] for v in values):
            raise AssertionError(f"jobs grouped into one stock call disagree on {name}: {values}")
        else:
            kwargs[name] = values[0]
    return kwargs


def stock_call(pipe, family: Family, jobs: list[Job]) -> list:
    """One stock pipeline call for requests sharing every scalar argument, a generator each."""
    result = pipe(**batched_kwargs(family, jobs))
    _check_images(result.images, jobs)
    return result.images


def serve_stock(pipe, family: Family, jobs: list[Job], cap: int) -> Run:
    """(a) with ``cap`` 1, (b) otherwise: oldest arrived request plus arrived ones with its key."""
    run, clock = Run(), Clock()
    upcoming, arrived = deque(sorted(jobs, key=lambda j: j.arrival)), []
    while upcoming or arrived:
        while upcoming and upcoming[0].arrival <= clock.now():
            arrived.append(upcoming.popleft())
        if not arrived:
            clock.wait_until(upcoming[0].arrival)
            continue
        group = [j for j in arrived if j.key == arrived[0].key][:cap]
        images = stock_call(pipe, family, group)
        done = clock.now()
        arrived = [j for j in arrived if j not in group]
        run.finished.update((j.request.request_id, done) for j in group)
        run.images += len(images)
        run.batches.append(len(group))
    return run


def serve_engine(engine: StepBatchingEngine, jobs: list[Job]) -> Run:
    """(c): submit what has arrived before each ``step()``; sleep until the next arrival when idle."""
    run, clock = Run(), Clock()
    upcoming = deque(sorted(jobs, key=lambda j: j.arrival))
    while upcoming or engine.has_work:
        while upcoming and upcoming[0].arrival <= clock.now():
            engine.submit(upcoming.popleft().request)
        if not engine.has_work:
            clock.wait_until(upcoming[0].arrival)
            continue
        outcomes, stats = engine.step()
        done = clock.now()
        for outcome in outcomes:
            if outcome.result is None:
                raise RuntimeError(f"engine failed {outcome.request_id}: {outcome.error}")
            run.finished[outcome.request_id] = done
            run.images += len(outcome.result.images)
        if stats is not None:
            run.batches.append(stats.samples)
    return run


# ---- measuring ---------------------------------------------------------------------------------------


def make_servers(pipe, family: Family = Family.SD) -> dict:
    """Each of ``family_methods(family)`` as a function of the jobs it serves."""
    fast = StepBatchingEngine(pipe, family, EngineConfig(max_batch_samples=CAP))
    servers = {
        "a": lambda jobs: serve_stock(pipe, family, jobs, cap=1),
        "b": lambda jobs: serve_stock(pipe, family, jobs, cap=CAP),
        "c": lambda jobs: serve_engine(fast, jobs),
    }
    if "c-exact" in family_methods(family):
        exact = StepBatchingEngine(pipe, family, EngineConfig(max_batch_samples=CAP, exact=True))
        servers["c-exact"] = lambda jobs: serve_engine(exact, jobs)
    return servers


def summarise(run: Run, jobs: list[Job]) -> dict[str, float]:
    if run.images != len(jobs) or set(run.finished) != {j.request.request_id for j in jobs}:
        got = f"{run.images} images for {len(run.finished)} requests"
        raise AssertionError(f"expected {len(jobs)} images, one per request; got {got}")
    latencies = sorted(run.finished[j.request.request_id] - j.arrival for j in jobs)
    return {
        "images_per_s": run.images / max(run.finished.values()),
        "latency_mean_s": statistics.fmean(latencies),
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "mean_batch": statistics.fmean(run.batches),
    }


def measure(servers: dict, jobs: list[Job], repeats: int) -> dict[str, dict[str, float]]:
    """Median of each figure over ``repeats`` runs, rotating the method order every repetition."""
    methods = tuple(m for m in METHODS if m in servers)
    per_method: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    for rep in range(repeats):
        for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
            per_method[method].append(summarise(servers[method](jobs), jobs))
    return {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for m, runs in per_method.items()}


def ratios(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        f"({x})/({y})": figures[x]["images_per_s"] / figures[y]["images_per_s"]
        for x, y in RATIOS
        if x in figures and y in figures
    }


# ---- reporting ---------------------------------------------------------------------------------------


def table(title: str, figures: dict[str, dict[str, float]], ratio: dict[str, float]) -> str:
    lines = [
        f"### {title}",
        "",
        "| method | img/s | latency mean s | p50 s | p95 s | mean batch |",
        "|---|---|---|---|---|---|",
    ]
    for m, f in figures.items():
        lines.append(
            f"| ({m}) | {f['images_per_s']:.2f} | {f['latency_mean_s']:.3f} | {f['latency_p50_s']:.3f} "
            f"| {f['latency_p95_s']:.3f} | {f['mean_batch']:.2f} |"
        )
    lines += ["", " · ".join(f"{name} = **{value:.2f}x**" for name, value in ratio.items()), ""]
    return "\n".join(lines)


def parse_rates(
    tokens: list[str] | None, sizes: list[int], family: Family = Family.SD
) -> dict[int, list[float]]:
    """``SIZE:R1,R2`` sets one size's rates; a bare number is a rate for every size."""
    rates = {s: list(FAMILY_RATES[family].get(s, ())) for s in sizes}
    if tokens:
        rates = {s: [] for s in sizes}
        for token in tokens:
            size, _, values = token.rpartition(":")
            for s in [int(size)] if size else sizes:
                rates.setdefault(s, []).extend(float(v) for v in values.split(","))
    return rates


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--family", type=Family, choices=FAMILIES, default=Family.SD, help="tiny model")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / ".cache" / "models")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--mix", choices=sorted(MIXES), default="diverse")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rates", nargs="+", help="Poisson req/s: '64:12,20 128:8,12' or '10' (every size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 1 repeat, 64 px")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.repeats, args.sizes = 8, 1, [64]
    multiple = SIZE_MULTIPLES.get(args.family, 8)
    for size in args.sizes:
        if size % multiple:
            parser.error(f"--sizes: {size} is not a multiple of {multiple} (family {args.family.value})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    family = args.family
    ensure_tiny_models(args.models_dir)
    spec = next(s for s in tiny_model_specs(args.models_dir) if s["id"] == TINY_MODEL_IDS[family])
    pipe = load_pipeline(ModelSpec(**spec))
    servers = make_servers(pipe, family)
    methods = tuple(m for m in METHODS if m in servers)
    rates = parse_rates(args.rates, args.sizes, family)
    print(f"# Step-level batching benchmark ({spec['id']}, {spec['scheduler']}, {args.mix} mix, ", end="")
    print(f"{args.requests} requests, cap {CAP}, ", end="")
    print(f"{args.repeats} repeats, {args.threads} threads, torch {torch.__version__})\n")
    results = []
    for size in args.sizes:
        requests = make_requests(args.requests, size, args.mix, args.seed, family)
        keys = len({Job(r, 0.0).key for r in requests})
        print(f"## {size}x{size}: {keys} distinct keys, {sample_steps(requests)} UNet sample-steps\n")
        warm = [Job(r, 0.0) for r in requests[:CAP]]
        for method in methods:
            servers[method](warm)
        for rate in [None, *rates[size]]:
            arrivals = arrival_times(len(requests), rate, args.seed)
            jobs = [Job(r, t) for r, t in zip(requests, arrivals, strict=True)]
            figures = measure(servers, jobs, args.repeats)
            pattern = "all at t=0" if rate is None else f"Poisson λ={rate:g}/s"
            pattern += f" (1-min load average after: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            print(table(f"{size} px, {pattern}", figures, ratios(figures)), flush=True)
            results.append(
                {
                    "family": family.value,
                    "size": size,
                    "rate": rate,
                    "figures": figures,
                    "ratios": ratios(figures),
                }
            )
    if args.json:
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
