"""One translation from any API's request body to a ``GenerationCall``.

Each API's schema owns its field names and its spec's defaults; everything else is the same for all
of them, so it is written once here: a body field named like a ``GenerationParams`` field (after the
API's renames, e.g. the node spec's ``batch_size`` → ``num_images``) is taken as sent, and a guidance
scale the caller did not send stays ``None``, so the model's own default applies (what
``GET /v1/models`` advertises).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from pydantic import BaseModel

from inference.types import GenerationParams
from serve.generation.calls import GenerationCall

PARAM_NAMES = frozenset(f.name for f in fields(GenerationParams))
#: Parameters a model has its own default for (``ModelSpec.default_*``).
MODEL_DEFAULTED = ("guidance_scale", "image_guidance_scale")


def explicit_choices(body: BaseModel) -> frozenset[str]:
    """Fields the caller set to something other than null or the default: only these can draw an
    'ignored by this model' warning (clients that always send every field must not get warnings)."""
    declared = type(body).model_fields
    return frozenset(
        name
        for name in body.model_fields_set
        if getattr(body, name) is not None and getattr(body, name) != declared[name].default
    )


def to_call(
    body: BaseModel,
    tenant: str,
    image: str,
    *,
    renames: Mapping[str, str] = {},
    model: str | None = None,
    priority: str | None = None,
    **computed: Any,
) -> GenerationCall:
    """The call ``body`` asks for; ``renames`` maps this API's field names to ours, ``computed`` gives
    values the API derived itself (a styled prompt, a parsed size), ``model`` a resolved model name."""
    ours = {renames.get(name, name): name for name in type(body).model_fields}
    values = {name: getattr(body, field) for name, field in ours.items() if name in PARAM_NAMES}
    for name in MODEL_DEFAULTED:
        if name in values and ours[name] not in body.model_fields_set:
            values[name] = None
    return GenerationCall(
        tenant=tenant,
        image=image,
        params=GenerationParams(**{**values, **computed}),
        model=model or getattr(body, "model", None) or None,
        output_format=getattr(body, "output_format", "png"),
        explicitly_set=explicit_choices(body),
        priority=priority,
    )
