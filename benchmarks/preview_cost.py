"""What previews of images in progress cost the batch, side by side with no previews, per family.

The same requests (same seeds, sizes and steps) run through one engine per configuration: no previews;
the fitted latent→RGB projection every 5 steps and every step (the worst case); the real VAE every 5
steps. Reported per configuration: engine seconds for the whole batch (best of ``--repeats``,
interleaved), previews made, milliseconds per preview (``StepStats.preview_s``, measured inside the
step), the share of step time previews took, and what the coordinator then spends per preview
(JPEG encode, ``serve.jobs.previews.preview_frame``) and sends (bytes). Tiny random-weight models on
CPU: their UNet step is tiny, so the *share* is a pessimistic bound for real models, whose steps are
10-100x longer while a projection's cost grows only with the latent pixels.

    .venv/bin/python benchmarks/preview_cost.py [--size 256] [--requests 8] [--steps 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
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
from serve.jobs.previews import preview_frame

#: (label, preview method, preview every k steps); k 0 is the baseline.
CONFIGS = (
    ("no previews", "latent_rgb", 0),
    ("latent_rgb every 5 steps", "latent_rgb", 5),
    ("latent_rgb every step", "latent_rgb", 1),
    ("vae every 5 steps", "vae", 5),
)


def requests(family: Family, args: argparse.Namespace, every: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            request_id=f"r{i}",
            model=TINY_MODEL_IDS[family],
            prompt=f"a lighthouse at dusk {i}",
            image=Image.new("RGB", (args.size, args.size), (i * 37 % 256, 90, 160)),
            seed=i,
            strength=1.0,
            steps=args.steps,
            guidance_scale=3.5,
            image_guidance_scale=1.5,
            preview_every=every,
        )
        for i in range(args.requests)
    ]


def run(pipe, family: Family, args, method: str, every: int) -> dict:
    """One batch to the end; engine seconds, previews, their seconds, one preview for the encode cost."""
    engine = StepBatchingEngine(
        pipe, family, EngineConfig(max_batch_samples=args.requests, preview_method=method)
    )
    _ = engine.previewer.projection  # fitted once per replica at its first preview: not part of a step
    batch = requests(family, args, every)
    for request in batch:
        engine.submit(request)
    step_s = preview_s = 0.0
    previews, sample = 0, None
    while engine.has_work:
        _, stats = engine.step()
        if stats is not None:
            step_s, preview_s, previews = (
                step_s + stats.step_s,
                preview_s + stats.preview_s,
                previews + stats.previews,
            )
        for request in batch:
            made = engine.take_previews(request.request_id)
            sample = made[0] if made else sample
    return {"step_s": step_s, "preview_s": preview_s, "previews": previews, "sample": sample}


def encode_cost(preview, repeats: int = 20) -> tuple[float, int]:
    """Milliseconds to turn one preview into its event frame (JPEG + base64), and the frame's size."""
    started = time.perf_counter()
    for _ in range(repeats):
        frame = preview_frame("img_x", preview)
    return (time.perf_counter() - started) / repeats * 1000, len(frame["image"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd,flux,sd3", help="comma-separated: sd, sdxl, flux, sd3")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--requests", type=int, default=8, help="requests in the batch (one image each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration, best kept")
    add_tiny_model_options(parser)
    args = parser.parse_args(argv)
    print(f"# Preview cost: {args.requests} requests of {args.size}² px, {args.steps} steps, one batch; CPU")
    print(f"# best of {args.repeats} interleaved runs per configuration; tiny random-weight models\n")
    print(
        "| family | configuration | engine s | vs none | previews | ms/preview | share of step time "
        "| encode ms/preview | frame bytes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.families.split(","):
        family = Family(name.strip())
        pipe = load_tiny_pipeline(family, args)
        run(pipe, family, argparse.Namespace(**{**vars(args), "requests": 2, "steps": 4}), "latent_rgb", 1)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, method, every in CONFIGS:
                result = run(pipe, family, args, method, every)
                if label not in best or result["step_s"] < best[label]["step_s"]:
                    best[label] = result
        base = best[CONFIGS[0][0]]["step_s"]
        for label, _, _ in CONFIGS:
            result = best[label]
            per = result["preview_s"] / result["previews"] * 1000 if result["previews"] else 0.0
            share = result["preview_s"] / result["step_s"] * 100
            encode_ms, size = encode_cost(result["sample"]) if result["sample"] else (0.0, 0)
            print(
                f"| {family.value} | {label} | {result['step_s']:.2f} | {result['step_s'] / base:.3f}x "
                f"| {result['previews']} | {per:.2f} | {share:.1f}% | {encode_ms:.2f} | {size} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
