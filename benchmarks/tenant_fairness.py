"""Tenant fairness on the full stack: does a tenant sending 10x the traffic hurt another tenant's latency?

Phases, measured in one run against one local stack (tiny model on CPU, engine cap 8):
  1. quiet alone: the quiet tenant's closed-loop clients (default 1) for ``--duration`` seconds;
  2. quiet + noisy, ``fair`` admission: the same quiet clients while the noisy tenant runs 10x as many;
  3. quiet + noisy, ``fifo`` admission (the baseline without fairness).
Prints both tenants' p50/p95 latency and throughput per phase, and the quiet tenant's p95 ratio against
alone. Absolute numbers are the tiny model's on this CPU, not a GPU's; the ratios are the point.

    .venv/bin/python benchmarks/tenant_fairness.py --duration 40
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_batching import (
    APP_NAME,
    LocalStack,
    PhaseResult,
    add_local_stack_arguments,
    percentile,
    run_load,
    source_images,
    wait_until,
)

QUIET_KEY, NOISY_KEY = "sk-quiet-fairness-bench", "sk-noisy-fairness-bench"
PHASES = (("alone", "fair", False), ("fair", "fair", True), ("fifo", "fifo", True))


def deploy(stack: LocalStack, admission: str) -> None:
    from ray import serve

    from serve.app import build_app

    app_args = copy.deepcopy(stack._app_args)
    for model in app_args["models"]:
        model["engine"] = {**model.get("engine", {}), "max_batch_samples": 8, "admission": admission}
    serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
    wait_until(
        lambda: httpx.get(f"{stack.base_url}/readyz", timeout=10).status_code == 200, 300, "/readyz 200"
    )


async def _phase(
    stack: LocalStack, args: argparse.Namespace, sources, with_noisy: bool
) -> dict[str, PhaseResult]:
    results = {"quiet": PhaseResult("quiet", None, duration_s=args.duration)}
    loads = [
        run_load(
            stack.base_url,
            {"Authorization": f"Bearer {QUIET_KEY}"},
            results["quiet"],
            sources,
            _clients(args, args.quiet_clients),
        )
    ]
    if with_noisy:
        results["noisy"] = PhaseResult("noisy", None, duration_s=args.duration)
        loads.append(
            run_load(
                stack.base_url,
                {"Authorization": f"Bearer {NOISY_KEY}"},
                results["noisy"],
                sources,
                _clients(args, args.quiet_clients * args.noisy_factor),
            )
        )
    await asyncio.gather(*loads)
    return results


def _clients(args: argparse.Namespace, count: int) -> argparse.Namespace:
    scoped = copy.copy(args)
    scoped.concurrency, scoped.max_requests = count, 10_000
    return scoped


def _row(phase: str, tenant: str, result: PhaseResult) -> dict:
    latencies = result.latencies_s
    return {
        "phase": phase,
        "tenant": tenant,
        "requests": result.ok,
        "errors": result.error_count,
        "img_per_s": round(result.images / result.elapsed_s, 2) if result.elapsed_s else None,
        "p50_s": round(percentile(latencies, 50), 2) if latencies else None,
        "p95_s": round(percentile(latencies, 95), 2) if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per phase")
    parser.add_argument("--quiet-clients", type=int, default=1)
    parser.add_argument("--noisy-factor", type=int, default=10)
    add_local_stack_arguments(parser)
    parser.set_defaults(torch_threads=1)  # one thread per replica: this benchmark's measured setting
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    os.environ["IMG2IMG_API_KEYS"] = json.dumps({QUIET_KEY: "quiet", NOISY_KEY: "noisy"})
    stack = LocalStack(args)
    rows = []
    try:
        stack.start()
        sources = source_images(args.size, count=4)
        deployed = None
        for label, admission, with_noisy in PHASES:
            if admission != deployed:  # a new admission policy redeploys the app
                deploy(stack, admission)
                deployed = admission
            started = time.monotonic()
            results = asyncio.run(_phase(stack, args, sources, with_noisy))
            print(f"[{label}] done in {time.monotonic() - started:.0f} s", flush=True)
            rows += [_row(label, tenant, result) for tenant, result in results.items()]
    finally:
        stack.stop()

    noisy = args.quiet_clients * args.noisy_factor
    print(
        f"\n### tenant fairness: quiet x{args.quiet_clients}, noisy x{noisy} clients, "
        f"{args.duration:g} s per phase\n"
    )
    print(
        "| phase | tenant | requests | errors | img/s | p50 s | p95 s |\n|---|---|---:|---:|---:|---:|---:|"
    )
    columns = ("phase", "tenant", "requests", "errors", "img_per_s", "p50_s", "p95_s")
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    quiet = {row["phase"]: row for row in rows if row["tenant"] == "quiet"}
    for phase in ("fair", "fifo"):
        if quiet[phase]["p95_s"] and quiet["alone"]["p95_s"]:
            ratio = quiet[phase]["p95_s"] / quiet["alone"]["p95_s"]
            print(f"quiet p95 with noisy ({phase}) / alone = {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
