"""Plain, torch-free records exchanged between the serving layer and the engine.

They are frozen so a request cannot change while the engine works on it, and they pickle cheaply
(Ray moves them between the ingress and model replicas).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from PIL import Image

MAX_SEED = 2**63 - 1


def draw_seed() -> int:
    """A fresh seed for a request that named none; returned to the caller so it can be replayed."""
    return secrets.randbelow(2**32)


def image_seeds(seed: int, num_images: int) -> tuple[int, ...]:
    """Image i of a request with seed s uses seed s + i, so each image can be reproduced alone."""
    return tuple(seed + i for i in range(num_images))


@dataclass(frozen=True)
class GenerationRequest:
    """One validated img2img request for one model.

    ``image`` is RGB and already at the output size (a multiple of 8, see ``images.output_size``):
    the ingress decodes and resizes, so replicas never see bad bytes. ``seed`` is always concrete
    (``draw_seed`` fills it in when the caller gave none).
    """

    request_id: str
    model: str
    prompt: str
    image: Image.Image
    seed: int
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    strength: float = 0.8
    steps: int = 20
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    num_images: int = 1
    exact: bool = False
    tenant: str = "default"

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def seeds(self) -> tuple[int, ...]:
        return image_seeds(self.seed, self.num_images)


@dataclass(frozen=True)
class Progress:
    """Denoising progress of one request, summed over its images."""

    steps_done: int
    steps_total: int

    @property
    def fraction(self) -> float:
        return self.steps_done / self.steps_total if self.steps_total else 1.0


@dataclass(frozen=True)
class GenerationResult:
    """The images of one finished request, in seed order, with what it cost."""

    request_id: str
    images: tuple[Image.Image, ...]
    seeds: tuple[int, ...]
    unet_steps: int
    queue_wait_s: float
    run_s: float
    compute_s: float = 0.0  # this request's share of the batched UNet time (usage metering)
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def width(self) -> int:
        return self.images[0].width

    @property
    def height(self) -> int:
        return self.images[0].height
