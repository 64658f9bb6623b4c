"""A model replica's memory behind a Serve handle: ``generate`` vs ``generate_stream``, round by round.

The second step after ``benchmarks/engine_memory.py`` (the engine alone does not grow): the same
``ModelWorker`` deployment the service runs, on the tiny SD model, driven straight through a
``DeploymentHandle`` (no ingress, no HTTP) with the soak's mix (sides 64/96/128, 4-12 steps, 1-2
images, 6 requests in flight). After each round it prints the replica's RSS, so a per-request leak
(a steady climb) can be told from high-water marks (steps that level off).

    PYTHONPATH=. .venv/bin/python benchmarks/replica_memory.py --mode stream --rounds 12
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from inference.models import Family
from inference.tiny import TINY_MODEL_IDS, ensure_tiny_models
from inference.types import GenerationRequest

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "memory-probe-worker"
IN_FLIGHT = 6


def replica_rss_mb() -> float:
    """RSS of the probe replica's process, found by its Ray process title."""
    for process in psutil.process_iter(["cmdline"]):
        if DEPLOYMENT in " ".join(process.info["cmdline"] or []):
            return process.memory_info().rss / 2**20
    raise RuntimeError(f"no process of {DEPLOYMENT} found")


async def one_round(handle, count: int, stream: bool, rng: random.Random, tag: str) -> None:
    sources = {
        side: Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))
        for side in (64, 96, 128)
    }
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        request = GenerationRequest(
            request_id=f"{tag}-{i}",
            model=TINY_MODEL_IDS[Family.SD],
            prompt="a lighthouse at dusk",
            image=sources[rng.choice((64, 96, 128))],
            seed=i,
            strength=rng.uniform(0.3, 1.0),
            steps=rng.randint(4, 12),
            guidance_scale=rng.uniform(1.5, 9.0),
            image_guidance_scale=1.5,
            num_images=rng.randint(1, 2),
        )
        async with slots:
            if stream:
                async for _ in handle.options(stream=True).generate_stream.remote(request):
                    pass
            else:
                await handle.generate.remote(request)

    await asyncio.gather(*(one(i) for i in range(count)))


async def run(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    from serve.deployments.model_worker import ModelWorker

    folder = ensure_tiny_models(ROOT / ".cache" / "tiny-models")[Family.SD]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        spec = {"id": "tiny-sd", "family": "sd", "source": str(folder), "smoke": True}
        worker = serve.deployment(ModelWorker).options(name=DEPLOYMENT, max_ongoing_requests=32)
        handle = serve.run(
            worker.bind(spec, {"max_batch_samples": 8}, 1), name="memory-probe", route_prefix=None
        )
        rng = random.Random(args.seed)
        print(f"# {DEPLOYMENT}: {args.mode}, {args.rounds} rounds of {args.per_round} requests\n")
        print("| round | requests so far | replica RSS MB | round s |\n|---|---|---|---|")
        for round_no in range(args.rounds):
            started = time.monotonic()
            await one_round(handle, args.per_round, args.mode == "stream", rng, f"r{round_no}")
            print(
                f"| {round_no} | {(round_no + 1) * args.per_round} | {replica_rss_mb():.0f} | "
                f"{time.monotonic() - started:.0f} |",
                flush=True,
            )
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["generate", "stream"], default="stream")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
