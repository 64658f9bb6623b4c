"""Loading stock diffusers img2img pipelines, and running them as the reference oracle.

``load_pipeline`` turns a ``ModelSpec`` into a ready pipeline (hub id or local ``save_pretrained``
folder, same path). ``run_stock`` runs the *unmodified* diffusers pipeline for one image of a request,
alone, with that image's own seed: whatever the engine does (batching, step interleaving), image ``i``
of a request must match ``run_stock(pipe, family, request, i)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from inference.errors import ModelLoadError
from inference.models import SCHEDULERS, Family, ModelSpec
from inference.types import GenerationRequest

_PIPELINE_CLASSES: dict[Family, type[DiffusionPipeline]] = {
    Family.SD: StableDiffusionImg2ImgPipeline,
    Family.SDXL: StableDiffusionXLImg2ImgPipeline,
    Family.INSTRUCT_PIX2PIX: StableDiffusionInstructPix2PixPipeline,
    Family.FLUX: FluxImg2ImgPipeline,
    Family.SD3: StableDiffusion3Img2ImgPipeline,
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def pipeline_class(family: Family | str) -> type[DiffusionPipeline]:
    """The stock diffusers img2img pipeline class of ``family``."""
    return _PIPELINE_CLASSES[Family(family)]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_like_path(source: str) -> bool:
    """True when ``source`` can only be a local folder (a hub id is exactly ``org/name``)."""
    return (
        os.path.isabs(source)
        or source.startswith(("./", "../", "~", ".\\"))
        or source in {".", ".."}
        or source.count("/") > 1
        or "\\" in source
    )


def _absent_components(folder: Path) -> dict[str, None]:
    """``{name: None}`` for each component a saved folder records as absent (``[null, null]``).

    diffusers writes an absent component (e.g. SD3 without its T5: ``text_encoder_3=None``) that way,
    but ``from_pretrained`` only accepts it back when told again, so the folder's word is passed on.
    """
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # from_pretrained reports a missing or broken index itself
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and all(v is None for v in value)
    }


def load_pipeline(spec: ModelSpec, device: str = "cpu") -> DiffusionPipeline:
    """Load ``spec``'s pipeline with its scheduler and dtype, on ``device``, ready for inference.

    Raises ``ModelLoadError`` naming the model and its source when the
    local folder is missing or the weights cannot be loaded.
    """
    diffusers.utils.logging.disable_progress_bar()  # "Loading pipeline components" bars flood server logs
    transformers.utils.logging.disable_progress_bar()
    path_like = _looks_like_path(spec.source)
    source = str(Path(spec.source).expanduser()) if path_like else spec.source
    local = Path(source).is_dir()
    if path_like and not local:
        raise ModelLoadError(
            f"model {spec.id!r}: source folder {spec.source!r} does not exist; point 'source' at a folder "
            "written by save_pretrained (for a random-weight smoke model run `python -m inference.tiny DIR`) "
            "or at a hub id like 'org/name'",
            param="source",
            value=spec.source,
        )
    kwargs: dict[str, Any] = {
        "dtype": _DTYPES[spec.dtype],  # diffusers 0.42 deprecates torch_dtype
        "variant": spec.variant,
        "local_files_only": local or _offline(),
    }
    if spec.family in (Family.SD, Family.INSTRUCT_PIX2PIX):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    elif spec.family is Family.SDXL:
        kwargs.update(add_watermarker=False)  # a watermark would alter the pixels the oracle compares
    # FLUX and SD3 pipelines take neither a safety checker nor a watermarker.
    if local:
        kwargs.update(_absent_components(Path(source)))
    try:
        pipe = pipeline_class(spec.family).from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"model {spec.id!r}: could not load {spec.family.value} pipeline from {spec.source!r}",
            param="source",
            value=spec.source,
            details=(
                f"{type(exc).__name__}: {exc}"
                + ("" if local else "; no local folder of that name exists either")
                + ("; HF_HUB_OFFLINE is set, so hub ids must already be in the cache" if _offline() else "")
            ),
        ) from exc
    scheduler_cls = getattr(diffusers, SCHEDULERS[spec.scheduler])
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    return pipe


def stock_kwargs(family: Family | str, request: GenerationRequest, image_index: int) -> dict[str, Any]:
    """The stock pipeline call arguments for image ``image_index`` of ``request``, generated alone."""
    family = Family(family)
    if not 0 <= image_index < request.num_images:
        raise IndexError(
            f"image_index {image_index} out of range for a request of {request.num_images} image(s)"
        )
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "image": request.image,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": 1,
        "generator": torch.Generator("cpu").manual_seed(request.seeds[image_index]),
    }
    if family in (Family.FLUX, Family.SD3):
        # These pipelines resize the image to height x width, which default to the model's native size
        # (1024 px), not the image's: the image is already at the output size, so keep it.
        kwargs.update(height=request.height, width=request.width)
    if family is Family.SD:
        kwargs["strength"] = request.strength
    elif family in (Family.SDXL, Family.SD3):
        # SD3: prompt_2 / negative_prompt_2 go to the second CLIP encoder; the T5 (if any) gets prompt.
        kwargs.update(
            strength=request.strength,
            prompt_2=request.prompt_2,
            negative_prompt_2=request.negative_prompt_2,
        )
    elif family is Family.FLUX:
        # Distilled guidance, no CFG: a negative prompt would switch on diffusers' "true CFG" only
        # with true_cfg_scale > 1, which this service does not configure. prompt_2 goes to T5.
        del kwargs["negative_prompt"]
        kwargs.update(strength=request.strength, prompt_2=request.prompt_2)
    else:
        kwargs["image_guidance_scale"] = request.image_guidance_scale
    return kwargs


@torch.inference_mode()
def run_stock(
    pipe: DiffusionPipeline,
    family: Family | str,
    request: GenerationRequest,
    image_index: int,
    output_type: str = "pil",
) -> Any:
    """The oracle: image ``image_index`` of ``request`` from the unmodified pipeline, run alone.

    Returns a PIL image (``output_type="pil"``), a numpy array (``"np"``) or latents (``"latent"``).
    """
    result = pipe(**stock_kwargs(family, request, image_index), output_type=output_type)
    return result.images[0]


def run_stock_request(
    pipe: DiffusionPipeline, family: Family | str, request: GenerationRequest, output_type: str = "pil"
) -> list[Any]:
    """Every image of ``request`` from the oracle, each generated alone with its own seed."""
    return [run_stock(pipe, family, request, i, output_type=output_type) for i in range(request.num_images)]
