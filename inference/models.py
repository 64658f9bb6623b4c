"""The model registry: which models a deployment serves and what each family does with a request.

Built from configuration (plain dicts, e.g. from the Serve config YAML) and validated up front with
errors that name the bad field, so a typo fails at start-up instead of on the first request.
Torch-free: the ingress uses it to validate requests and to list models.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inference.errors import UnknownModelError


class Family(enum.StrEnum):
    """Pipeline families; each decides which request parameters matter."""

    SD = "sd"
    SDXL = "sdxl"
    INSTRUCT_PIX2PIX = "instruct-pix2pix"
    FLUX = "flux"
    SD3 = "sd3"


#: Parameters every family honours.
_COMMON = frozenset({"prompt", "negative_prompt", "steps", "guidance_scale", "seed", "num_images"})

#: What each family honours beyond the common set. Anything else that a caller sets explicitly is
#: ignored *with a warning in the response* (never silently misapplied): e.g. instruct-pix2pix has
#: no strength (it always denoises from pure noise conditioned on the image latents). FLUX.1's
#: guidance is distilled into an input embedding, so it has no negative prompt (diffusers' "true CFG"
#: is not configured here); its ``prompt_2`` goes to the T5 encoder. SD3's ``prompt_2`` /
#: ``negative_prompt_2`` go to its second CLIP encoder, as in diffusers (the T5 gets ``prompt``).
HONOURED_PARAMETERS: Mapping[Family, frozenset[str]] = {
    Family.SD: _COMMON | {"strength"},
    Family.SDXL: _COMMON | {"strength", "prompt_2", "negative_prompt_2"},
    Family.INSTRUCT_PIX2PIX: _COMMON | {"image_guidance_scale"},
    Family.FLUX: (_COMMON - {"negative_prompt"}) | {"strength", "prompt_2"},
    Family.SD3: _COMMON | {"strength", "prompt_2", "negative_prompt_2"},
}

#: Denoiser (UNet / transformer) rows one sample takes with full guidance (classifier-free: uncond +
#: text; instruct-pix2pix: text + image + uncond; FLUX: one, its guidance is an input embedding).
#: A compiled model's largest row bucket must hold at least this many.
GUIDED_ROWS: Mapping[Family, int] = {
    Family.SD: 2,
    Family.SDXL: 2,
    Family.INSTRUCT_PIX2PIX: 3,
    Family.FLUX: 1,
    Family.SD3: 2,
}

#: Parameters that only some families honour; these are the ones that can draw a warning.
OPTIONAL_PARAMETERS = frozenset(
    {"negative_prompt", "strength", "prompt_2", "negative_prompt_2", "image_guidance_scale"}
)

#: Families whose image sides must be multiples of 16 rather than 8 (see ``ModelSpec.size_multiple``).
SIZE_MULTIPLES: Mapping[Family, int] = {Family.FLUX: 16, Family.SD3: 16}

#: ``default_guidance_scale`` of a spec that names none: the value each family's models are made for
#: (FLUX.1-dev's distilled guidance 3.5, SD3's 7.0, the UNet families' 7.5).
DEFAULT_GUIDANCE_SCALE: Mapping[Family, float] = {
    Family.SD: 7.5,
    Family.SDXL: 7.5,
    Family.INSTRUCT_PIX2PIX: 7.5,
    Family.FLUX: 3.5,
    Family.SD3: 7.0,
}

#: What ``guidance_scale`` means per family, for ``GET /v1/models``.
GUIDANCE_KIND: Mapping[Family, str] = {
    Family.SD: "classifier-free",
    Family.SDXL: "classifier-free",
    Family.INSTRUCT_PIX2PIX: "classifier-free (text and image)",
    Family.FLUX: "distilled (an input embedding; no negative prompt)",
    Family.SD3: "classifier-free",
}

#: Families trained with flow matching: they denoise with (and only with) the flow-matching Euler
#: scheduler, and are its only users.
FLOW_MATCH_FAMILIES = frozenset({Family.FLUX, Family.SD3})
FLOW_MATCH_SCHEDULER = "flow_match_euler"

SCHEDULERS: Mapping[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "pndm": "PNDMScheduler",
    FLOW_MATCH_SCHEDULER: "FlowMatchEulerDiscreteScheduler",
}

DTYPES = ("float32", "float16", "bfloat16")

_MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _teach(field_name: str, value: Any, allowed: Iterable[Any]) -> ValueError:
    choices = ", ".join(repr(a) for a in allowed)
    return ValueError(f"model config field {field_name!r} = {value!r} is not valid; choose one of: {choices}")


#: Fields older configs may still carry, and why they went away (a config with one fails at start-up).
REMOVED_FIELDS = {
    name: (
        "no API applied it (each applies its own spec's default: REST steps 30 and strength 0.7, node "
        "steps 20 and strength 0.8); delete the line"
    )
    for name in ("default_steps", "default_strength")
}


@dataclass(frozen=True)
class ModelSpec:
    """One servable model.

    ``source`` is a hub id (``org/name``) or a local folder holding a ``save_pretrained`` pipeline;
    both go through the same ``from_pretrained`` path. ``smoke`` marks random-weight test models
    whose output is noise, so listings can say so plainly.
    """

    id: str
    family: Family
    source: str
    dtype: str = "float32"
    scheduler: str | None = None  # None: the family's own (flow_match_euler for flux/sd3, else ddim)
    # The model's own defaults, applied when a caller leaves the parameter out (``GenerationParams``
    # None) and advertised by GET /v1/models. Steps and strength have none: each API applies its spec's.
    default_guidance_scale: float | None = None  # None: DEFAULT_GUIDANCE_SCALE of the family
    default_image_guidance_scale: float = 1.5
    max_side: int = 2048
    smoke: bool = False
    description: str = ""
    variant: str | None = None

    def __post_init__(self) -> None:
        if not _MODEL_ID.fullmatch(self.id or ""):
            raise ValueError(
                f"model config field 'id' = {self.id!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
        if not isinstance(self.family, Family):
            try:
                object.__setattr__(self, "family", Family(self.family))
            except ValueError:
                raise _teach("family", self.family, [f.value for f in Family]) from None
        if self.dtype not in DTYPES:
            raise _teach("dtype", self.dtype, DTYPES)
        flow = self.family in FLOW_MATCH_FAMILIES
        if self.scheduler is None:
            object.__setattr__(self, "scheduler", FLOW_MATCH_SCHEDULER if flow else "ddim")
        if self.scheduler not in SCHEDULERS:
            raise _teach("scheduler", self.scheduler, SCHEDULERS)
        if flow and self.scheduler != FLOW_MATCH_SCHEDULER:
            raise ValueError(
                f"model {self.id!r}: scheduler = {self.scheduler!r} cannot run family "
                f"{self.family.value!r}, which is trained with flow matching (it predicts a velocity, not "
                f"noise); use scheduler {FLOW_MATCH_SCHEDULER!r}"
            )
        if not flow and self.scheduler == FLOW_MATCH_SCHEDULER:
            raise ValueError(
                f"model {self.id!r}: scheduler {FLOW_MATCH_SCHEDULER!r} is only for the flow-matching "
                f"families ({', '.join(sorted(f.value for f in FLOW_MATCH_FAMILIES))}); family "
                f"{self.family.value!r} predicts noise: choose one of "
                + ", ".join(repr(k) for k in SCHEDULERS if k != FLOW_MATCH_SCHEDULER)
            )
        if self.default_guidance_scale is None:
            object.__setattr__(self, "default_guidance_scale", DEFAULT_GUIDANCE_SCALE[self.family])
        if not self.source:
            raise ValueError(f"model {self.id!r}: 'source' must be a hub id or a local folder")
        if self.max_side % 8 or not 64 <= self.max_side <= 4096:
            raise ValueError(
                f"model {self.id!r}: max_side = {self.max_side} must be a multiple of 8 in 64..4096"
            )

    @property
    def honoured_parameters(self) -> frozenset[str]:
        return HONOURED_PARAMETERS[self.family]

    def unused_parameter_warnings(self, explicitly_set: Iterable[str]) -> tuple[str, ...]:
        """Warnings for parameters the caller set that this family does not use.

        Only parameters the caller *explicitly* set draw a warning: a default value is not a choice.
        """
        unused = sorted(set(explicitly_set) & OPTIONAL_PARAMETERS - self.honoured_parameters)
        return tuple(
            f"parameter '{name}' is ignored by model '{self.id}' (family {self.family.value})"
            for name in unused
        )

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's 8, times 2 where the transformer takes
        2x2 latent patches (FLUX packs them, SD3 patchifies them)."""
        return SIZE_MULTIPLES.get(self.family, 8)

    def describe(self) -> dict[str, Any]:
        """The public description served by ``GET /v1/models``."""
        return {
            "id": self.id,
            "family": self.family.value,
            "scheduler": self.scheduler,
            "dtype": self.dtype,
            "smoke_test_model": self.smoke,
            "description": self.description,
            # Only what this model applies when a caller leaves the parameter out (steps and strength
            # default per API: REST 30 and 0.7, node 20 and 0.8, as their specs say).
            "defaults": {
                "guidance_scale": self.default_guidance_scale,
                "image_guidance_scale": self.default_image_guidance_scale,
            },
            "guidance": GUIDANCE_KIND[self.family],
            "honoured_parameters": sorted(self.honoured_parameters),
            "max_side": self.max_side,
        }


@dataclass(frozen=True)
class ModelRegistry:
    """The models one application serves, looked up by id; the first one is the default."""

    specs: tuple[ModelSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not self.specs:
            raise ValueError("the model registry is empty: configure at least one model")
        ids = [s.id for s in self.specs]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(dupes)}")

    @classmethod
    def from_config(cls, entries: Iterable[Mapping[str, Any]]) -> ModelRegistry:
        specs = []
        for index, entry in enumerate(entries):
            removed = sorted(set(entry) & REMOVED_FIELDS.keys())
            if removed:
                raise ValueError(
                    f"models[{index}]: field {removed[0]!r} was removed: {REMOVED_FIELDS[removed[0]]}"
                )
            unknown = set(entry) - set(ModelSpec.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"models[{index}]: unknown field(s) {sorted(unknown)}; "
                    f"allowed: {sorted(ModelSpec.__dataclass_fields__)}"
                )
            specs.append(ModelSpec(**entry))
        return cls(tuple(specs))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(s.id for s in self.specs)

    @property
    def default(self) -> ModelSpec:
        return self.specs[0]

    def get(self, model_id: str | None) -> ModelSpec:
        """The spec for ``model_id`` (the default when None); unknown ids are a client error."""
        if model_id is None:
            return self.default
        for spec in self.specs:
            if spec.id == model_id:
                return spec
        raise UnknownModelError(
            f"unknown model {model_id!r}; available models: {', '.join(self.ids)}",
            param="model",
            value=model_id,
        )
