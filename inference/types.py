"""Plain, torch-free records exchanged between the serving layer and the engine.

They are frozen so a request cannot change while the engine works on it, and they pickle cheaply
(Ray moves them between the ingress and model replicas).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from PIL import Image

#: The largest seed an image may use (torch generators take 64-bit seeds; we stay in int64). Image i
#: of a request uses seed + i, so an API that allows n images per request allows seeds up to MAX_SEED - n.
MAX_SEED = 2**63 - 1


def draw_seed() -> int:
    """A fresh seed for a request that named none; returned to the caller so it can be replayed."""
    return secrets.randbelow(2**32)


def image_seeds(seed: int, num_images: int) -> tuple[int, ...]:
    """Image i of a request with seed s uses seed s + i, so each image can be reproduced alone."""
    return tuple(seed + i for i in range(num_images))


@dataclass(frozen=True, kw_only=True)
class GenerationParams:
    """What to generate: every parameter a caller chooses, under one set of names for every layer.

    One type for the whole path: each API builds it from its own fields, applying its own spec's
    defaults (the only place a default value lives), the ingress job carries it, and the engine's
    ``GenerationRequest`` is one. ``None`` means "not chosen": the seed is then drawn at the ingress,
    and the guidance scales are the model's own (``ModelSpec.default_*``, what ``GET /v1/models``
    advertises). ``width``/``height`` 0 mean the source image's size.
    """

    prompt: str
    negative_prompt: str | None = None
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    strength: float
    steps: int
    guidance_scale: float | None = None
    image_guidance_scale: float | None = None
    num_images: int = 1
    seed: int | None = None
    width: int = 0
    height: int = 0


@dataclass(frozen=True, kw_only=True)
class GenerationRequest(GenerationParams):
    """One validated img2img request for one model, as the engine runs it.

    ``image`` is RGB and already at the output size (a multiple of 8, see ``images.output_size``):
    the ingress decodes and resizes, so replicas never see bad bytes. Every choice is concrete here:
    the seed is drawn (``draw_seed``) and the guidance scales resolved before a request is built, and
    ``width``/``height`` are the image's.
    """

    request_id: str
    model: str
    image: Image.Image
    seed: int
    guidance_scale: float
    image_guidance_scale: float
    exact: bool = False
    tenant: str = "default"
    #: Admission lane: 0 high, 1 normal, 2 low. The engine admits a higher lane first, and is fair
    #: between tenants within a lane (``EngineConfig.admission``).
    priority: int = 1
    #: A preview of each image every this many of its denoising steps (0: none); the engine enforces
    #: its own minimum (``EngineConfig.preview_min_steps``).
    preview_every: int = 0

    def __post_init__(self) -> None:
        if (self.width, self.height) == (0, 0):
            object.__setattr__(self, "width", self.image.width)
            object.__setattr__(self, "height", self.image.height)
        elif (self.width, self.height) != self.image.size:
            raise ValueError(f"request size {self.width}x{self.height} is not its image's {self.image.size}")

    @property
    def seeds(self) -> tuple[int, ...]:
        return image_seeds(self.seed, self.num_images)


@dataclass(frozen=True)
class Preview:
    """A small picture of one image still being denoised (``inference.previews``); never stored."""

    image_index: int
    step: int  # denoising steps this image has done
    steps: int  # of its total
    image: Image.Image


@dataclass(frozen=True)
class Progress:
    """Denoising progress of one request, summed over its images."""

    steps_done: int
    steps_total: int
    #: Requests ahead of this one in the engine's admission order while none of its images has entered
    #: a batch (0: next); None once it runs.
    queue_position: int | None = None
    #: Seconds until its last image is done, from the measured step time of its image size (None until
    #: the engine has measured one): its own remaining steps, plus, while queued, the work ahead of it
    #: spread over the samples one step runs at once.
    eta_s: float | None = None
    #: Previews made since the last report (only for requests that asked for them).
    previews: tuple[Preview, ...] = ()

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
