"""Local demo: generate images with the tiny smoke model through the batching engine, into a folder.

This is what ``make run`` does until the Ray Serve application lands: it builds the random-weight
models offline (their output is noise: they prove the machinery, not the art), submits a mixed set
of requests that share denoising steps, and writes each output image as PNG.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inference.images import ImageLimits, encode_image, load_source_image, output_size, prepare_source
from inference.types import GenerationRequest

_MIX = [  # (strength, steps, guidance) per demo request: deliberately all different
    (0.3, 10, 3.0),
    (0.5, 20, 7.5),
    (0.75, 30, 5.0),
    (1.0, 15, 9.0),
]


def _gradient(size: int) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 128.0)]
    )
    return Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8))


def _source(path: Path | None, size: int) -> Image.Image:
    if path is None:
        return _gradient(size)
    source = load_source_image(path.read_bytes(), ImageLimits())
    return prepare_source(source, output_size(source.width, source.height, size, size, 2048))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the output PNGs")
    parser.add_argument("--models-dir", type=Path, default=Path(".cache/models"), help="tiny model cache")
    parser.add_argument("--image", type=Path, help="source image (JPEG/PNG/WebP); default: a gradient")
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (multiple of 8)")
    parser.add_argument("--prompt", default="a watercolor painting of a lighthouse")
    args = parser.parse_args(argv)

    import torch

    from inference.engine import EngineConfig, StepBatchingEngine
    from inference.models import ModelRegistry
    from inference.pipelines import load_pipeline
    from inference.tiny import ensure_tiny_models, tiny_model_specs

    ensure_tiny_models(args.models_dir)
    spec = ModelRegistry.from_config(tiny_model_specs(args.models_dir)).default
    print(f"model {spec.id} ({spec.family.value}) from {spec.source}: {spec.description}")
    engine = StepBatchingEngine(load_pipeline(spec), spec.family, EngineConfig(max_batch_samples=8))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    source = _source(args.image, args.size)
    for i, (strength, steps, guidance) in enumerate(_MIX):
        engine.submit(
            GenerationRequest(
                request_id=f"demo-{i}",
                model=spec.id,
                prompt=args.prompt,
                image=source,
                seed=1000 + i,
                strength=strength,
                steps=steps,
                guidance_scale=guidance,
                image_guidance_scale=spec.default_image_guidance_scale,
                num_images=2,
            )
        )
    started = time.perf_counter()
    outcomes = engine.run_until_idle()
    elapsed = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    count = 0
    for outcome in sorted(outcomes, key=lambda o: o.request_id):
        if outcome.error is not None:
            print(f"{outcome.request_id}: failed: {outcome.error}")
            continue
        for seed, image in zip(outcome.result.seeds, outcome.result.images, strict=True):
            path = args.out / f"{outcome.request_id}-seed{seed}.png"
            path.write_bytes(encode_image(image, "png"))
            count += 1
            print(f"wrote {path} ({image.width}x{image.height})")
    print(f"{count} images in {elapsed:.2f}s ({count / elapsed:.1f} img/s) with step-level batching")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
