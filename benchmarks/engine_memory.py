"""Where does a model replica's memory go over a long run? The engine alone, in fresh processes.

The 10-minute soak (``python -m loadtests.soak``) showed the model replica's RSS rising in steps
while every other process stayed flat. This script separates the candidate causes, each case in its
own fresh process so none inherits another's heap:

* ``fixed``: one shape, one step count, one image per request. A leak per request grows here too.
* ``mixed``: the soak's mix (sides 64/96/128, 4-12 steps, 1-2 images, 1-8 requests at a time):
  many distinct tensor shapes. Per-shape caches (oneDNN primitives, the allocator's size classes)
  grow with the shapes seen and then level off.
* ``mixed`` with ``MALLOC_ARENA_MAX=2``: if glibc's per-thread arenas are the cause, this flattens it.

For each case: RSS after warm-up, after the run, the least-squares slope over the second half (MB per
1000 requests), and RSS after ``malloc_trim(0)`` (what the C allocator was holding but not using).

    PYTHONPATH=. .venv/bin/python benchmarks/engine_memory.py --requests 1200
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "fixed": ("fixed", {}),
    "mixed": ("mixed", {}),
    "mixed, MALLOC_ARENA_MAX=2": ("mixed", {"MALLOC_ARENA_MAX": "2"}),
}


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares MB per 1000 requests over the second half of the samples (warm-up excluded)."""
    tail = points[len(points) // 2 :]
    if len(tail) < 2:
        return 0.0
    xs, ys = [p[0] for p in tail], [p[1] for p in tail]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    return (
        0.0
        if var == 0
        else 1000 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    )


def run_case(workload: str, requests: int, threads: int, seed: int) -> dict:
    """The child: the tiny SD engine serving ``requests`` requests in waves; RSS after every wave."""
    import numpy as np
    import torch
    from PIL import Image

    from inference.engine import EngineConfig, StepBatchingEngine
    from inference.models import Family, ModelSpec
    from inference.pipelines import load_pipeline
    from inference.tiny import TINY_MODEL_IDS, ensure_tiny_models
    from inference.types import GenerationRequest

    torch.set_num_threads(threads)
    folder = ensure_tiny_models(ROOT / ".cache" / "tiny-models")[Family.SD]
    pipe = load_pipeline(ModelSpec(id="tiny-sd", family=Family.SD, source=str(folder), scheduler="ddim"))
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=8))
    rng = random.Random(seed)
    sources = {
        side: Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
        for side in (64, 96, 128)
    }

    def request(i: int) -> GenerationRequest:
        mixed = workload == "mixed"
        return GenerationRequest(
            request_id=f"r{i}",
            model=TINY_MODEL_IDS[Family.SD],
            prompt=rng.choice(["a lighthouse", "a red bicycle on a wall", "a snowy village"]),
            image=sources[rng.choice((64, 96, 128)) if mixed else 64],
            seed=i,
            strength=rng.uniform(0.3, 1.0) if mixed else 0.75,
            steps=rng.randint(4, 12) if mixed else 8,
            guidance_scale=rng.uniform(1.5, 9.0) if mixed else 7.5,
            image_guidance_scale=1.5,
            num_images=rng.randint(1, 2) if mixed else 1,
        )

    sent, points, warm = 0, [], None
    while sent < requests:
        for _ in range(min(rng.randint(1, 8) if workload == "mixed" else 4, requests - sent)):
            engine.submit(request(sent))
            sent += 1
        while engine.has_work:
            for outcome in engine.step()[0]:
                if outcome.error is not None:
                    raise RuntimeError(f"{outcome.request_id}: {outcome.error}")
        if warm is None and sent >= min(100, requests // 10):
            warm = (sent, rss_mb())
        if warm is not None:
            points.append((sent, rss_mb()))
    before_trim = rss_mb()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {
        "warm_rss_mb": warm[1],
        "last_rss_mb": before_trim,
        "growth_mb": before_trim - warm[1],
        "mb_per_1000_requests": slope_per_1000(points),
        "after_malloc_trim_mb": rss_mb(),
        "requests": requests,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=["fixed", "mixed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.requests, args.threads, args.seed)))
        return 0

    print(f"# Engine memory over {args.requests} requests per case ({args.threads} torch thread(s))\n")
    columns = ["case", "RSS after warm-up MB", "RSS at end MB", "growth MB", "MB/1000 req (2nd half)"]
    print("| " + " | ".join([*columns, "after malloc_trim MB"]) + " |")
    print("|---|---|---|---|---|---|")
    for name, (workload, env) in CASES.items():
        command = [sys.executable, __file__, "--child", workload, "--requests", str(args.requests)]
        command += ["--threads", str(args.threads), "--seed", str(args.seed)]
        done = subprocess.run(
            command, env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, check=True
        )
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['warm_rss_mb']:.0f} | {r['last_rss_mb']:.0f} | {r['growth_mb']:+.1f} | "
            f"{r['mb_per_1000_requests']:+.1f} | {r['after_malloc_trim_mb']:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
