"""Priority lanes under a low-priority flood: the high-priority p95, with and without lanes, side by side.

A flood of low-priority requests arrives at once (a batch-import client), then high-priority ones
arrive one every few steps (interactive users). Both runs use the same engine, cap and request stream;
the only difference is whether the requests carry their lanes (``GenerationRequest.priority``) or all
run in the normal lane. Latency is wall time from a request's arrival to its result, measured in one
process on the tiny SD model (CPU), so the ratio, not the absolute seconds, is the result.

    .venv/bin/python benchmarks/priority_lanes.py [--flood 48] [--high 12] [--every 3] [--cap 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image

from benchmarks.tiny_models import add_tiny_model_options, load_tiny_pipeline
from inference.engine import EngineConfig, StepBatchingEngine
from inference.models import Family
from inference.tiny import TINY_MODEL_IDS
from inference.types import GenerationRequest

HIGH, NORMAL, LOW = 0, 1, 2


def request(request_id: str, seed: int, lane: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model=TINY_MODEL_IDS[Family.SD],
        prompt="a lighthouse at dusk",
        image=Image.new("RGB", (64, 64), (seed * 37 % 256, 90, 160)),
        seed=seed,
        strength=0.8,
        steps=10,
        guidance_scale=7.5,
        image_guidance_scale=1.5,
        priority=lane,
    )


def run(pipe, args: argparse.Namespace, lanes: bool) -> dict[str, list[float]]:
    """Latencies (s) per class; the flood is in the queue before the first high-priority arrival."""
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=args.cap))
    arrived: dict[str, float] = {}
    for i in range(args.flood):
        engine.submit(request(f"low-{i}", i, LOW if lanes else NORMAL))
        arrived[f"low-{i}"] = time.perf_counter()
    latencies: dict[str, list[float]] = {"high": [], "low": []}
    sent, step = 0, 0
    while engine.has_work or sent < args.high:
        if sent < args.high and step % args.every == 0:
            name = f"high-{sent}"
            engine.submit(request(name, 1000 + sent, HIGH if lanes else NORMAL))
            arrived[name] = time.perf_counter()
            sent += 1
        outcomes, _ = engine.step()
        step += 1
        for outcome in outcomes:
            latencies[outcome.request_id.split("-")[0]].append(
                time.perf_counter() - arrived[outcome.request_id]
            )
    return latencies


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=48, help="low-priority requests queued at once")
    parser.add_argument("--high", type=int, default=12, help="high-priority requests, arriving over time")
    parser.add_argument("--every", type=int, default=3, help="engine steps between high-priority arrivals")
    parser.add_argument("--cap", type=int, default=4, help="samples per UNet call (EngineConfig)")
    add_tiny_model_options(parser)
    args = parser.parse_args(argv)
    pipe = load_tiny_pipeline(Family.SD, args)
    run(pipe, argparse.Namespace(**{**vars(args), "flood": 4, "high": 1}), lanes=True)  # warm-up
    rows = []
    for name, lanes in (("no priorities (one lane)", False), ("priority lanes", True)):
        latencies = run(pipe, args, lanes)
        rows.append((name, latencies))
    base_high = p95(rows[0][1]["high"])
    print(
        f"# Priority lanes: {args.flood} low-priority requests queued at once, {args.high} high-priority ones"
    )
    print(f"# arriving every {args.every} steps; cap {args.cap} samples per UNet call; tiny SD, CPU\n")
    print("| run | high p50 s | high p95 s | high p95 vs one lane | low p50 s | low p95 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, latencies in rows:
        high, low = latencies["high"], latencies["low"]
        print(
            f"| {name} | {statistics.median(high):.2f} | {p95(high):.2f} | {p95(high) / base_high:.2f}x "
            f"| {statistics.median(low):.2f} | {p95(low):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
