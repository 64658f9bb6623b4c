"""Previews of images still being denoised: small RGB pictures of a sample's current latents.

A full VAE decode per preview would cost about what a denoising step costs, for every watched sample;
ComfyUI and A1111 instead show a *linear projection* of the latents to RGB (one 3×C matrix and a
bias, a few kilo-FLOPs per latent pixel). Their matrices are hand-fitted per family and go stale with
every fine-tuned VAE. Ours is fitted when a replica first needs it, from the loaded VAE itself: a fixed
set of smooth colour fields is encoded, brought into the model's latent space (the family's scaling and
shift, what the denoiser sees), and the least-squares map from a latent pixel to the mean colour of
the image patch it covers is the projection. Every family and every VAE gets its own, SD's 4 channels
or FLUX's and SD3's 16 alike; FLUX's packed 2×2 tokens are unpacked first (``spatial_latents``).

``method="vae"`` decodes with the real VAE instead (sharper, and about one step's cost per preview);
either way a preview is at most ``max_side`` pixels on its longer side. Previews are handed to the
caller and never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from inference.engine_config import PREVIEW_METHODS

#: The calibration set: CALIBRATION_IMAGES smooth random colour fields of CALIBRATION_SIDE² pixels,
#: made from a fixed seed so every replica of a model fits the same projection.
CALIBRATION_IMAGES = 12
CALIBRATION_SIDE = 128
CALIBRATION_GRID = 4
CALIBRATION_SEED = 20241129


def calibration_images(count: int = CALIBRATION_IMAGES, side: int = CALIBRATION_SIDE) -> torch.Tensor:
    """(count, 3, side, side) in [-1, 1]: random colours on a coarse grid, bilinearly smoothed, so a
    latent pixel's patch is nearly one colour and every colour direction is represented."""
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    grid = torch.rand(count, 3, CALIBRATION_GRID, CALIBRATION_GRID, generator=generator) * 2 - 1
    return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)


def fit_projection(latents: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The (C + 1, 3) least-squares map [latent, 1] → RGB in [-1, 1], from model-space ``latents``
    (N, C, h, w) and the ``pixels`` (N, 3, H, W) they encode, pooled to the latent grid."""
    pooled = F.adaptive_avg_pool2d(pixels.float(), latents.shape[-2:])
    inputs = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    targets = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(inputs, targets).solution


def project(latents: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) model-space latents → (N, h, w, 3) uint8 RGB through a fitted projection."""
    weights = projection.to(device=latents.device)
    rgb = torch.einsum("nchw,cr->nhwr", latents.float(), weights[:-1]) + weights[-1]
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)


def bounded(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` shrunk (aspect kept) so its longer side is at most ``max_side``."""
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


class LatentPreviewer:
    """Turns a batch of samples' latents into small RGB previews for one loaded pipeline."""

    def __init__(self, pipe, adapter, method: str = "latent_rgb", max_side: int = 256) -> None:
        if method not in PREVIEW_METHODS:
            raise ValueError(f"preview method {method!r}; choose one of {PREVIEW_METHODS}")
        self._pipe, self._adapter = pipe, adapter
        self.method, self.max_side = method, max_side
        self._projection: torch.Tensor | None = None

    def configured(self, method: str, max_side: int) -> LatentPreviewer:
        """This previewer with other settings; the fitted projection (it depends on the VAE only) is kept."""
        if (method, max_side) == (self.method, self.max_side):
            return self
        other = LatentPreviewer(self._pipe, self._adapter, method, max_side)
        other._projection = self._projection
        return other

    @property
    def projection(self) -> torch.Tensor:
        """The fitted latent → RGB map, fitted on first use (one VAE encode of the calibration set)."""
        if self._projection is None:
            pixels = calibration_images()
            with torch.inference_mode():
                latents = self._adapter.image_latents(self._pipe, pixels)
            self._projection = fit_projection(latents.cpu(), pixels)
        return self._projection

    def render(self, latents: torch.Tensor, size: tuple[int, int]) -> list[Image.Image]:
        """Previews of same-size samples: ``latents`` as the engine holds them, ``size`` (height, width)
        of their output images."""
        spatial = self._adapter.spatial_latents(self._pipe, latents, size)
        if self.method == "vae":
            pixels = self._adapter.decode(self._pipe, latents, size)
            images = self._pipe.image_processor.postprocess(
                pixels, output_type="pil", do_denormalize=[True] * len(pixels)
            )
        else:
            rgb = project(spatial, self.projection).cpu().numpy()
            images = [Image.fromarray(frame) for frame in rgb]
        return [bounded(image, self.max_side) for image in images]
