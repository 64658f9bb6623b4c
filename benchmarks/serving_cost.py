"""Serving cost: full-stack throughput divided by the engine's own throughput at the same batch size.

Both sides run the same closed-loop workload (``--concurrency`` requests kept in flight, mixed strength,
steps and guidance, the same request stream) with the engine's cap at ``--cap`` and one torch thread:
  1. direct: the batching engine in this process, no HTTP, no Ray, no storage;
  2. full stack: Ray Serve + ingress + model replica + local storage over HTTP (``make run``'s config).
The ratio says what the serving layer (HTTP, validation, decode/encode, Ray hops, storage) costs on
this machine; on a GPU the denoising dominates more and the ratio moves toward 1.

    .venv/bin/python benchmarks/serving_cost.py --duration 40
"""

from __future__ import annotations

import argparse
import base64
import io
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_batching import (
    LocalStack,
    PhaseResult,
    add_local_stack_arguments,
    measure,
    percentile,
    request_body,
    source_images,
)


def direct(args: argparse.Namespace, sources: list[str]) -> dict[str, float]:
    """The engine alone, ``concurrency`` requests in flight, for ``duration`` seconds."""
    import torch
    from PIL import Image

    from inference.engine import EngineConfig, StepBatchingEngine
    from inference.models import ModelRegistry
    from inference.pipelines import load_pipeline
    from inference.tiny import ensure_tiny_models, tiny_model_specs
    from inference.types import GenerationRequest

    torch.set_num_threads(args.torch_threads)
    ensure_tiny_models(args.models_dir)
    spec = ModelRegistry.from_config(tiny_model_specs(args.models_dir)).default
    engine = StepBatchingEngine(load_pipeline(spec), spec.family, EngineConfig(max_batch_samples=args.cap))
    images = [
        Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB") for url in sources
    ]
    rng, counter = random.Random(f"{args.seed}-direct"), iter(range(10**9))

    def submit(submitted: dict[str, float]) -> None:
        body = request_body(rng, sources, None)
        request = GenerationRequest(
            request_id=f"r{next(counter)}",
            model=spec.id,
            prompt=body["prompt"],
            image=images[sources.index(body["image"])],
            seed=body["seed"],
            strength=body["strength"],
            steps=body["steps"],
            guidance_scale=body["guidance_scale"],
            image_guidance_scale=spec.default_image_guidance_scale,
        )
        engine.submit(request)
        submitted[request.request_id] = time.monotonic()

    warm: dict[str, float] = {}
    for _ in range(args.concurrency):  # warm-up: one full round, not counted
        submit(warm)
    engine.run_until_idle()
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < args.duration or submitted:
        while time.monotonic() - started < args.duration and len(submitted) < args.concurrency:
            submit(submitted)
        outcomes, _ = engine.step()
        latencies += [time.monotonic() - submitted.pop(o.request_id) for o in outcomes]
    elapsed = time.monotonic() - started
    return {
        "img_per_s": len(latencies) / elapsed,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
    }


def full_stack(args: argparse.Namespace, sources: list[str]) -> dict[str, float]:
    stack = LocalStack(args)
    try:
        stack.start()
        stack.deploy(args.cap)
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        result: PhaseResult = measure("full stack", args.cap, stack.base_url, headers, sources, None, args)
    finally:
        stack.stop()
    if result.error_count:
        raise SystemExit(f"full stack had HTTP errors: {result.errors}")
    return {
        "img_per_s": result.images / result.elapsed_s,
        "p50_s": percentile(result.latencies_s, 50),
        "p95_s": percentile(result.latencies_s, 95),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of load per side")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cap", type=int, default=8, help="the engine's max_batch_samples on both sides")
    parser.add_argument("--size", type=int, default=64)
    add_local_stack_arguments(parser)
    parser.set_defaults(torch_threads=1)  # one thread per replica: this benchmark's measured setting
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=5000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    sources = source_images(args.size, count=4)
    figures = {"direct engine": direct(args, sources)}
    figures["full stack"] = full_stack(args, sources)
    print(
        f"\n### serving cost: {args.concurrency} in flight, cap {args.cap}, {args.size}², "
        f"{args.torch_threads} torch thread(s), CPU\n"
    )
    print("| path | img/s | p50 s | p95 s |\n|---|---:|---:|---:|")
    for name, row in figures.items():
        print(f"| {name} | {row['img_per_s']:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |")
    ratio = figures["full stack"]["img_per_s"] / figures["direct engine"]["img_per_s"]
    print(f"full stack / direct engine throughput = **{ratio:.2f}x**")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
