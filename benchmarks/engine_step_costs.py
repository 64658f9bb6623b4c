"""Where a batched denoising step's time goes, eager vs compiled UNet, measured side by side.

On the tiny random-weight ``sd`` model (CPU unless CUDA is present), a flood of mixed-parameter
requests (strength, steps, guidance 1.0-9.0: one- and two-row samples) keeps the engine at its cap.
For each variant it reports, over *steady* steps (a full batch, nobody admitted or finished, so
admission's prompt/VAE encodes and the final decodes are excluded):

- ``forward ms``: the UNet forward calls (``StepStats.forward_s``);
- ``engine ms``: the engine's own host work per step, ``step_s - forward_s`` (input assembly,
  padding, guidance, scheduler step, bookkeeping), and its share of the step;
- images/s over the whole run (admission and decode included).

Variants: ``eager`` (no buckets), ``eager+buckets`` (calls padded to ``--buckets``), and, unless
``--no-compile``, ``compiled`` (``torch.compile`` mode ``default`` with the same buckets, every
bucket warmed first; the warm-up time is printed). On CUDA ``forward_s`` only times kernel launches
(the engine never synchronises), so read ``engine ms`` from a CPU run or the GPU check.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_step_costs.py [--cap 8] [--requests 48]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from inference.engine import EngineConfig, StepBatchingEngine
from inference.engine_config import OptimizeConfig
from inference.models import ModelSpec
from inference.optimize import apply_optimize_config
from inference.pipelines import load_pipeline
from inference.tiny import ensure_tiny_models, tiny_model_specs
from inference.types import GenerationRequest

REPO_ROOT = Path(__file__).resolve().parents[1]
STRENGTHS, STEPS, GUIDANCE = (0.5, 0.75, 1.0), (10, 20, 30), (1.0, 5.0, 7.5, 9.0)


def requests(count: int, size: int) -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return [
        GenerationRequest(
            request_id=f"r{i}",
            model="tiny-sd",
            prompt=f"prompt number {i}",
            image=image,
            seed=i,
            strength=STRENGTHS[i % 3],
            steps=STEPS[(i // 3) % 3],
            guidance_scale=GUIDANCE[i % 4],
            image_guidance_scale=1.5,
        )
        for i in range(count)
    ]


def measure(engine: StepBatchingEngine, work: list[GenerationRequest], cap: int) -> dict[str, float]:
    for request in work:
        engine.submit(request)
    steady, images = [], 0
    started = time.perf_counter()
    while engine.has_work:
        outcomes, stats = engine.step()
        images += sum(len(o.result.images) for o in outcomes if o.result)
        if stats and stats.samples == cap and not stats.admitted and not stats.finished:
            steady.append(stats)
    wall = time.perf_counter() - started
    forward = statistics.median(s.forward_s for s in steady)
    step = statistics.median(s.step_s for s in steady)
    engine_ms = statistics.median(s.step_s - s.forward_s for s in steady)
    return {
        "steady_steps": len(steady),
        "forward_ms": forward * 1e3,
        "engine_ms": engine_ms * 1e3,
        "engine_share": engine_ms / step,
        "images_per_s": images / wall,
        "padded_rows": sum(s.padded_rows for s in steady) / max(len(steady), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--buckets", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = REPO_ROOT / ".cache" / "models"
    ensure_tiny_models(root)
    spec = ModelSpec(**next(s for s in tiny_model_specs(root) if s["id"] == "tiny-sd"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = EngineConfig(max_batch_samples=args.cap)
    buckets = OptimizeConfig(row_buckets=tuple(args.buckets), warmup_sizes=((args.size, args.size),))
    variants: dict[str, tuple[object, OptimizeConfig]] = {
        "eager": (load_pipeline(spec, device), OptimizeConfig()),
        "eager+buckets": (load_pipeline(spec, device), buckets),
    }
    if not args.no_compile:
        compiled = OptimizeConfig(
            compile="default", row_buckets=buckets.row_buckets, warmup_sizes=buckets.warmup_sizes
        )
        variants["compiled"] = (load_pipeline(spec, device), compiled)
    results = {}
    for name, (pipe, optimize) in variants.items():
        apply_optimize_config(pipe, optimize)
        engine = StepBatchingEngine(pipe, "sd", config, optimize=optimize)
        warm_started = time.perf_counter()
        engine.warm_up()
        warm_s = time.perf_counter() - warm_started
        measure(engine, requests(args.cap * 2, args.size), args.cap)  # allocator and caches warm
        results[name] = measure(engine, requests(args.requests, args.size), args.cap) | {"warm_up_s": warm_s}
    print(
        f"\nengine step costs: tiny sd, {args.size} px, cap {args.cap}, {args.requests} mixed requests,",
        device,
    )
    print(
        "| variant | steady steps | UNet forward ms | engine ms/step | engine share | img/s"
        " | pad rows/step | warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['steady_steps']} | {r['forward_ms']:.2f} | {r['engine_ms']:.3f} | "
            f"{r['engine_share']:.1%} | {r['images_per_s']:.2f} | {r['padded_rows']:.1f} | "
            f"{r['warm_up_s']:.1f} |"
        )
    if "compiled" in results:
        ratio = results["eager+buckets"]["forward_ms"] / results["compiled"]["forward_ms"]
        print(f"compiled vs eager (same buckets): UNet forward {ratio:.2f}x faster")


if __name__ == "__main__":
    main()
