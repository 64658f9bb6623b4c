"""What each pipeline family does at admission, at every guidance step and at decode.

Each adapter mirrors its stock diffusers pipeline line by line (prompt encoding, strength →
timesteps, the order in which a request's generator is consumed, the guidance formula, the VAE
scaling) so a request run through the batching engine equals the stock pipeline run on it alone.
Everything here works on ONE sample at batch 1; the engine concatenates samples' rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from inference.models import Family
from inference.types import GenerationRequest


@dataclass
class Conditioning:
    """Per-request tensors, computed once and shared by every image of the request.

    ``rows`` is how many UNet rows one sample takes: 1 without guidance, 2 for classifier-free
    guidance (uncond, text), 3 for instruct-pix2pix (text, image, uncond). The tensors are in the
    same row order as the stock pipeline builds them.
    """

    rows: int
    encoder_hidden_states: torch.Tensor
    guidance_scale: float
    image_guidance_scale: float = 1.0
    added_cond: dict[str, torch.Tensor] | None = None
    image_latents: torch.Tensor | None = None
    latent_dist: object | None = None


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (n, 1, 1, 1) column in ``like``'s dtype (as a Python float would be)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def strength_timesteps(scheduler, steps: int, strength: float) -> tuple[torch.Tensor, bool]:
    """diffusers' ``get_timesteps`` for img2img, including its float truncation (``int(0.29*100) == 28``).

    Sets the scheduler's begin index as the pipeline does. Where the stock pipeline would run zero
    steps (``int(steps * strength) == 0``, it then fails), we run one step instead and say so: the
    second return value is True when that happened.
    """
    init_timestep = min(int(steps * strength), steps)
    clamped = init_timestep < 1
    init_timestep = max(init_timestep, 1)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, clamped


class _StableDiffusion:
    """StableDiffusionImg2ImgPipeline: two-row guidance, strength-truncated schedule."""

    uses_strength = True

    cfg_rows = 2

    def do_cfg(self, pipe, request: GenerationRequest) -> bool:
        return request.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None

    def rows(self, pipe, request: GenerationRequest) -> int:
        """UNet rows one sample of ``request`` takes, known before any model work."""
        return self.cfg_rows if self.do_cfg(pipe, request) else 1

    def encode_prompt(self, pipe, request: GenerationRequest) -> Conditioning:
        cfg = self.do_cfg(pipe, request)
        positive, negative = pipe.encode_prompt(request.prompt, pipe.device, 1, cfg, request.negative_prompt)
        embeds = torch.cat([negative, positive]) if cfg else positive
        return Conditioning(2 if cfg else 1, embeds, request.guidance_scale)

    def encode_images(self, pipe, conds: list[Conditioning], images: torch.Tensor) -> None:
        """One VAE encode for the images of several requests (one row each, same size); each
        request keeps its own slice of the latent distribution, sampled with its own generator."""
        dtype = conds[0].encoder_hidden_states.dtype
        moments = pipe.vae.encode(images.to(device=pipe.device, dtype=dtype)).latent_dist.parameters
        for cond, row in zip(conds, moments.split(1), strict=True):
            cond.latent_dist = DiagonalGaussianDistribution(row)

    def scale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return pipe.vae.config.scaling_factor * latents

    def unscale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return latents / pipe.vae.config.scaling_factor

    def start_latents(self, pipe, cond: Conditioning, scheduler, timesteps, generator) -> torch.Tensor:
        """VAE sample, then noise, from the sample's own generator, in the pipeline's order."""
        dtype = cond.encoder_hidden_states.dtype
        init = cond.latent_dist.sample(generator)
        init = self.scale_latents(pipe, init.to(dtype))
        noise = randn_tensor(init.shape, generator=generator, device=pipe.device, dtype=dtype)
        return scheduler.add_noise(init, noise, timesteps[:1].repeat(1))

    def unet_input(self, cond: Conditioning, scaled: torch.Tensor) -> torch.Tensor:
        return scaled

    def guide(self, cond: Conditioning, noise_pred: torch.Tensor) -> torch.Tensor:
        if cond.rows == 1:
            return noise_pred
        uncond, text = noise_pred.chunk(2)
        return uncond + cond.guidance_scale * (text - uncond)

    def guide_batch(self, conds: list[Conditioning], noise_pred: torch.Tensor) -> list[torch.Tensor]:
        """``guide`` for every sample of a UNet call in a few tensor ops instead of a few per sample
        (on a GPU each small op is a kernel launch). Samples without guidance pass through."""
        sizes = [cond.rows for cond in conds]
        guided = list(noise_pred.split(sizes))
        offsets = torch.tensor(sizes).cumsum(0) - torch.tensor(sizes)
        guided_ids = [i for i, cond in enumerate(conds) if cond.rows > 1]
        if not guided_ids:
            return guided
        first = offsets[guided_ids].to(noise_pred.device)
        rows = [noise_pred.index_select(0, first + k) for k in range(self.cfg_rows)]
        combined = self.combine(rows, [conds[i] for i in guided_ids])
        for i, row in zip(guided_ids, combined.split(1), strict=True):
            guided[i] = row
        return guided

    def combine(self, rows: list[torch.Tensor], conds: list[Conditioning]) -> torch.Tensor:
        uncond, text = rows
        scale = _column([c.guidance_scale for c in conds], uncond)
        return uncond + scale * (text - uncond)

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode(self.unscale_latents(pipe, latents), return_dict=False)[0]


def _float32_vae(pipe):
    """The pipeline's VAE in float32, for SDXL VAEs whose config says ``force_upcast``.

    SDXL's original VAE overflows in float16. The stock pipeline casts its VAE to float32 around
    encode (any half dtype) and decode (float16 only) and back afterwards; half-precision weights
    survive that round trip exactly, so a float32 copy made once computes what stock computes,
    without casting ~84 M parameters twice per call (and a warning each time). Production SDXL
    deployments usually load an fp16-safe VAE (``force_upcast: false``) and need no copy.
    """
    cached = getattr(pipe, "_img2img_float32_vae", None)
    if cached is None or cached[0] is not pipe.vae:
        vae = pipe.vae if pipe.vae.dtype == torch.float32 else copy.deepcopy(pipe.vae).to(torch.float32)
        cached = (pipe.vae, vae)
        pipe._img2img_float32_vae = cached
    return cached[1]


class _StableDiffusionXL(_StableDiffusion):
    """StableDiffusionXLImg2ImgPipeline: two text encoders, pooled embeds and time ids per row."""

    def encode_prompt(self, pipe, request: GenerationRequest) -> Conditioning:
        cfg = self.do_cfg(pipe, request)
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=request.prompt_2,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=request.negative_prompt,
            negative_prompt_2=request.negative_prompt_2,
        )
        size = (request.height, request.width)
        projection_dim = (
            int(pooled.shape[-1])
            if pipe.text_encoder_2 is None
            else pipe.text_encoder_2.config.projection_dim
        )
        time_ids, neg_time_ids = pipe._get_add_time_ids(
            size,
            (0, 0),
            size,
            6.0,
            2.5,
            size,
            (0, 0),
            size,
            dtype=embeds.dtype,
            text_encoder_projection_dim=projection_dim,
        )
        if cfg:
            embeds = torch.cat([neg_embeds, embeds])
            pooled = torch.cat([neg_pooled, pooled])
            time_ids = torch.cat([neg_time_ids, time_ids])
        added = {"text_embeds": pooled.to(pipe.device), "time_ids": time_ids.to(pipe.device)}
        return Conditioning(2 if cfg else 1, embeds, request.guidance_scale, added_cond=added)

    def encode_images(self, pipe, conds: list[Conditioning], images: torch.Tensor) -> None:
        images = images.to(device=pipe.device, dtype=conds[0].encoder_hidden_states.dtype)  # as stock
        if pipe.vae.config.force_upcast:
            moments = _float32_vae(pipe).encode(images.float()).latent_dist.parameters
        else:
            moments = pipe.vae.encode(images).latent_dist.parameters
        for cond, row in zip(conds, moments.split(1), strict=True):
            cond.latent_dist = DiagonalGaussianDistribution(row)

    def _latent_stats(self, pipe, latents: torch.Tensor):
        config = pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return None
        as_tensor = lambda v: torch.tensor(v).view(1, 4, 1, 1).to(latents.device, latents.dtype)  # noqa: E731
        return as_tensor(mean), as_tensor(std)

    def scale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(pipe, latents)
        if stats is None:
            return pipe.vae.config.scaling_factor * latents
        mean, std = stats
        return (latents - mean) * pipe.vae.config.scaling_factor / std

    def unscale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        stats = self._latent_stats(pipe, latents)
        if stats is None:
            return latents / pipe.vae.config.scaling_factor
        mean, std = stats
        return latents * std / pipe.vae.config.scaling_factor + mean

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        upcast = pipe.vae.dtype == torch.float16 and bool(pipe.vae.config.force_upcast)  # as stock
        vae = _float32_vae(pipe) if upcast else pipe.vae
        vae_dtype = next(iter(vae.post_quant_conv.parameters())).dtype
        return vae.decode(self.unscale_latents(pipe, latents.to(vae_dtype)), return_dict=False)[0]


class _InstructPix2Pix(_StableDiffusion):
    """StableDiffusionInstructPix2PixPipeline: three-row guidance, image latents on channels, no strength."""

    uses_strength = False
    cfg_rows = 3

    def do_cfg(self, pipe, request: GenerationRequest) -> bool:
        return request.guidance_scale > 1.0 and request.image_guidance_scale >= 1.0

    def encode_prompt(self, pipe, request: GenerationRequest) -> Conditioning:
        cfg = self.do_cfg(pipe, request)
        embeds = pipe._encode_prompt(request.prompt, pipe.device, 1, cfg, request.negative_prompt)
        return Conditioning(3 if cfg else 1, embeds, request.guidance_scale, request.image_guidance_scale)

    def encode_images(self, pipe, conds: list[Conditioning], images: torch.Tensor) -> None:
        dtype = conds[0].encoder_hidden_states.dtype
        modes = pipe.vae.encode(images.to(device=pipe.device, dtype=dtype)).latent_dist.mode()
        for cond, image_latents in zip(conds, modes.split(1), strict=True):
            if cond.rows == 3:
                image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
            cond.image_latents = image_latents

    def start_latents(self, pipe, cond: Conditioning, scheduler, timesteps, generator) -> torch.Tensor:
        _, _, height, width = cond.image_latents.shape
        shape = (1, pipe.vae.config.latent_channels, height, width)
        dtype = cond.encoder_hidden_states.dtype
        return (
            randn_tensor(shape, generator=generator, device=pipe.device, dtype=dtype)
            * scheduler.init_noise_sigma
        )

    def unet_input(self, cond: Conditioning, scaled: torch.Tensor) -> torch.Tensor:
        return torch.cat([scaled, cond.image_latents], dim=1)

    def guide(self, cond: Conditioning, noise_pred: torch.Tensor) -> torch.Tensor:
        if cond.rows == 1:
            return noise_pred
        text, image, uncond = noise_pred.chunk(3)
        return uncond + cond.guidance_scale * (text - image) + cond.image_guidance_scale * (image - uncond)

    def combine(self, rows: list[torch.Tensor], conds: list[Conditioning]) -> torch.Tensor:
        text, image, uncond = rows
        scale = _column([c.guidance_scale for c in conds], text)
        image_scale = _column([c.image_guidance_scale for c in conds], text)
        return uncond + scale * (text - image) + image_scale * (image - uncond)

    def decode(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]


ADAPTERS = {
    Family.SD: _StableDiffusion(),
    Family.SDXL: _StableDiffusionXL(),
    Family.INSTRUCT_PIX2PIX: _InstructPix2Pix(),
}
