"""Style presets for the REST API's ``style`` field: named prompt augmentations.

A style appends descriptive terms to the prompt and avoids-terms to the negative prompt; it never
replaces what the caller wrote. Unknown names are a 400 that lists the known ones (``GET /v1/styles``).
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.errors import InvalidInputError


@dataclass(frozen=True)
class Style:
    name: str
    description: str
    prompt_suffix: str
    negative_suffix: str

    def apply(self, prompt: str, negative_prompt: str | None) -> tuple[str, str]:
        negative = ", ".join(p for p in (negative_prompt, self.negative_suffix) if p)
        return f"{prompt}, {self.prompt_suffix}", negative


STYLES: dict[str, Style] = {
    style.name: style
    for style in (
        Style(
            "realistic",
            "photographic realism",
            "photorealistic, natural lighting, high detail, 35mm photo",
            "cartoon, illustration, painting, cgi",
        ),
        Style(
            "artistic",
            "painterly fine art",
            "fine art painting, expressive brush strokes, rich colors",
            "photo, photorealistic, flat",
        ),
        Style(
            "cyberpunk",
            "neon-lit futuristic",
            "cyberpunk, neon lights, futuristic city, high contrast",
            "daylight, rustic, pastel",
        ),
        Style(
            "anime",
            "anime / manga",
            "anime style, cel shading, clean line art, vibrant palette",
            "photorealistic, 3d render, blurry",
        ),
        Style(
            "watercolor",
            "soft watercolor",
            "watercolor painting, soft washes, paper texture",
            "photo, harsh lines, digital",
        ),
        Style(
            "oil-painting",
            "classic oil painting",
            "oil painting, impasto, thick brush strokes, canvas",
            "photo, digital art, smooth",
        ),
        Style(
            "sketch",
            "pencil sketch",
            "pencil sketch, graphite, cross hatching, monochrome",
            "color, photo, painting",
        ),
        Style(
            "3d-render",
            "3D render",
            "3d render, octane render, global illumination, studio lighting",
            "flat, sketch, painting",
        ),
    )
}


def resolve_style(name: str | None) -> Style | None:
    """The named preset, None for no style; an unknown name is a client error listing the known ones."""
    if name is None:
        return None
    style = STYLES.get(name.strip().lower())
    if style is None:
        raise InvalidInputError(
            f"unknown style {name!r}; available styles: {', '.join(STYLES)}",
            code="invalid_style",
            param="style",
            value=name,
        )
    return style
