"""What each pipeline family does at admission, at every guidance step and at decode.

Each adapter mirrors its stock diffusers pipeline line by line (prompt encoding, strength →
timesteps, the order in which a request's generator is consumed, the guidance formula, the VAE
scaling) so a request run through the batching engine equals the stock pipeline run on it alone.
Everything here works on ONE sample at batch 1; the engine concatenates samples' rows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
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
    #: Model inputs shared by every row of a call rather than concatenated (FLUX's position ids).
    shared: dict | None = None


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars as a (n, 1, 1, 1) column in ``like``'s dtype (as a Python float would be)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


def strength_timesteps(adapter, scheduler, steps: int, strength: float) -> tuple[torch.Tensor, bool]:
    """diffusers' ``get_timesteps`` for img2img, with the family's own truncation (``first_step``).

    Sets the scheduler's begin index as the pipeline does. Where the stock pipeline would run zero
    steps (it then fails), we run one step instead and say so: the second return value is True
    when that happened.
    """
    t_start, clamped = adapter.first_step(steps, strength)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps, clamped


class _StableDiffusion:
    """StableDiffusionImg2ImgPipeline: two-row guidance, strength-truncated schedule."""

    uses_strength = True
    #: Latent pixels per model token side (FLUX packs 2x2 latents into one token).
    #: The model input that carries the latents (its layout is normalised for compiled models).
    latent_input = "sample"
    #: Whether exact mode may share a call between multi-row samples (the UNet's only batch-variant
    #: GEMMs are the time embeddings, which ``inference.exact`` runs per sample).
    exact_in_batches = True

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.unet

    def token_patch(self, pipe) -> int:
        """Latent pixels per model token side: image sides must be multiples of VAE scale × this."""
        return 1

    def first_step(self, steps: int, strength: float) -> tuple[int, bool]:
        """(index of the first timestep, clamped): SD's ``int(steps * strength)`` truncation."""
        init_timestep = min(int(steps * strength), steps)
        return max(steps - max(init_timestep, 1), 0), init_timestep < 1

    def schedule_key(self, request: GenerationRequest) -> tuple:
        return (request.steps,)

    def set_timesteps(self, pipe, scheduler, request: GenerationRequest) -> None:
        scheduler.set_timesteps(request.steps, device=pipe.device)

    def model_rows(self, cond: Conditioning, scheduler, latents: torch.Tensor, t: torch.Tensor) -> dict:
        """One sample's rows of every model input (the engine concatenates them across samples)."""
        rows = {
            "sample": self.unet_input(cond, scheduler.scale_model_input(latents, t)),
            "timestep": t.expand(cond.rows),
            "encoder_hidden_states": cond.encoder_hidden_states,
        }
        rows.update(cond.added_cond or {})
        return rows

    def call_model(self, pipe, inputs: dict[str, torch.Tensor], cond: Conditioning) -> torch.Tensor:
        added = {key: inputs[key] for key in ("text_embeds", "time_ids") if key in inputs}
        return pipe.unet(
            inputs["sample"],
            inputs["timestep"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

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

    def encoder_vae(self, pipe):
        """The VAE that encodes images (SDXL's may need a float32 copy)."""
        return pipe.vae

    def image_latents(self, pipe, pixels: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → model-space latents (the encoding's mean, scaled as the denoiser sees
        it), spatial (N, C, h, w) for every family: what preview projections are fitted on."""
        vae = self.encoder_vae(pipe)
        mean = vae.encode(pixels.to(device=pipe.device, dtype=vae.dtype)).latent_dist.mean
        return self.scale_latents(pipe, mean.to(pipe.vae.dtype))

    def spatial_latents(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Latents as the engine holds them → (N, C, h, w); only FLUX's packed tokens differ."""
        return latents

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

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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

    def encoder_vae(self, pipe):
        return _float32_vae(pipe) if pipe.vae.config.force_upcast else pipe.vae

    def encode_images(self, pipe, conds: list[Conditioning], images: torch.Tensor) -> None:
        images = images.to(device=pipe.device, dtype=conds[0].encoder_hidden_states.dtype)  # as stock
        if pipe.vae.config.force_upcast:
            images = images.float()
        moments = self.encoder_vae(pipe).encode(images).latent_dist.parameters
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

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
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

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]


class _FlowMatching(_StableDiffusion):
    """What SD3 and FLUX.1 share: a transformer denoiser predicting a velocity, flow-matching Euler
    steps (``x + (σ_next − σ)·v``), latents shifted and scaled by the VAE config, and the stock
    pipelines' float truncation of strength (``int(steps − steps · strength)``)."""

    latent_input = "hidden_states"
    exact_in_batches = False  # a transformer's GEMMs are batch-variant everywhere: exact runs alone
    shift_defaults = (0.5, 1.15)  # calculate_shift's base/max shift as the stock pipeline defaults them

    def denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def first_step(self, steps: int, strength: float) -> tuple[int, bool]:
        init_timestep = min(steps * strength, steps)
        t_start = int(max(steps - init_timestep, 0))
        if steps - t_start < 1:
            return steps - 1, True
        return t_start, False

    def _mu(self, pipe, request: GenerationRequest) -> float:
        tokens = self.token_patch(pipe) if self.token_patch(pipe) > 1 else 2
        seq_len = (request.height // pipe.vae_scale_factor // tokens) * (
            request.width // pipe.vae_scale_factor // tokens
        )
        config = pipe.scheduler.config
        base, top = self.shift_defaults
        return calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", base),
            config.get("max_shift", top),
        )

    def scale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor

    def unscale_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        return latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor

    def start_latents(self, pipe, cond: Conditioning, scheduler, timesteps, generator) -> torch.Tensor:
        """VAE sample, then noise, from the sample's own generator; ``scale_noise`` at the first step."""
        dtype = cond.encoder_hidden_states.dtype
        init = self.scale_latents(pipe, cond.latent_dist.sample(generator))
        noise = randn_tensor(init.shape, generator=generator, device=pipe.device, dtype=dtype)
        return scheduler.scale_noise(init, timesteps[:1].repeat(1), noise).to(dtype)

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return pipe.vae.decode(self.unscale_latents(pipe, latents), return_dict=False)[0]


class _StableDiffusion3(_FlowMatching):
    """StableDiffusion3Img2ImgPipeline: CFG rows (uncond, text), two CLIP encoders and an optional T5."""

    shift_defaults = (0.5, 1.16)

    def token_patch(self, pipe) -> int:
        return int(pipe.transformer.config.patch_size)

    def do_cfg(self, pipe, request: GenerationRequest) -> bool:
        return request.guidance_scale > 1

    def schedule_key(self, request: GenerationRequest) -> tuple:
        return (request.steps, request.height, request.width)

    def set_timesteps(self, pipe, scheduler, request: GenerationRequest) -> None:
        kwargs = {"mu": self._mu(pipe, request)} if scheduler.config.get("use_dynamic_shifting") else {}
        scheduler.set_timesteps(request.steps, device=pipe.device, **kwargs)

    def encode_prompt(self, pipe, request: GenerationRequest) -> Conditioning:
        cfg = self.do_cfg(pipe, request)
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            prompt=request.prompt,
            prompt_2=request.prompt_2,
            prompt_3=None,
            device=pipe.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=request.negative_prompt,
            negative_prompt_2=request.negative_prompt_2,
        )
        if cfg:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])
        return Conditioning(
            2 if cfg else 1, embeds, request.guidance_scale, added_cond={"pooled_projections": pooled}
        )

    def model_rows(self, cond: Conditioning, scheduler, latents: torch.Tensor, t: torch.Tensor) -> dict:
        return {
            "hidden_states": latents,
            "timestep": t.expand(cond.rows),
            "encoder_hidden_states": cond.encoder_hidden_states,
            "pooled_projections": cond.added_cond["pooled_projections"],
        }

    def call_model(self, pipe, inputs: dict[str, torch.Tensor], cond: Conditioning) -> torch.Tensor:
        return pipe.transformer(**inputs, joint_attention_kwargs=None, return_dict=False)[0]


class _Flux(_FlowMatching):
    """FluxImg2ImgPipeline: distilled guidance as a per-sample input (one row, no CFG), 2x2-packed
    latent tokens with size-dependent position ids, a size-dependent schedule shift, CLIP + T5."""

    cfg_rows = 1

    def token_patch(self, pipe) -> int:
        return 2  # latents are packed 2x2 into tokens

    def do_cfg(self, pipe, request: GenerationRequest) -> bool:
        return False  # guidance is an embedding (true CFG with negative prompts is not served)

    def schedule_key(self, request: GenerationRequest) -> tuple:
        return (request.steps, request.height, request.width)

    def set_timesteps(self, pipe, scheduler, request: GenerationRequest) -> None:
        sigmas = np.linspace(1.0, 1 / request.steps, request.steps)
        scheduler.set_timesteps(sigmas=sigmas, device=pipe.device, mu=self._mu(pipe, request))

    def encode_prompt(self, pipe, request: GenerationRequest) -> Conditioning:
        embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=request.prompt, prompt_2=request.prompt_2, device=pipe.device, num_images_per_prompt=1
        )
        added = {"pooled_projections": pooled}
        if pipe.transformer.config.guidance_embeds:
            added["guidance"] = torch.full(
                [1], request.guidance_scale, device=pipe.device, dtype=torch.float32
            )
        height = 2 * (request.height // (pipe.vae_scale_factor * 2))
        width = 2 * (request.width // (pipe.vae_scale_factor * 2))
        image_ids = pipe._prepare_latent_image_ids(1, height // 2, width // 2, pipe.device, embeds.dtype)
        shared = {"txt_ids": text_ids, "img_ids": image_ids}
        return Conditioning(1, embeds, request.guidance_scale, added_cond=added, shared=shared)

    def start_latents(self, pipe, cond: Conditioning, scheduler, timesteps, generator) -> torch.Tensor:
        latents = super().start_latents(pipe, cond, scheduler, timesteps, generator)
        batch, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)

    def model_rows(self, cond: Conditioning, scheduler, latents: torch.Tensor, t: torch.Tensor) -> dict:
        rows = {
            "hidden_states": latents,
            "timestep": t.expand(1).to(latents.dtype) / 1000,
            "encoder_hidden_states": cond.encoder_hidden_states,
        }
        rows.update(cond.added_cond)
        return rows

    def call_model(self, pipe, inputs: dict[str, torch.Tensor], cond: Conditioning) -> torch.Tensor:
        return pipe.transformer(
            **inputs,
            txt_ids=cond.shared["txt_ids"],
            img_ids=cond.shared["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

    def spatial_latents(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return pipe._unpack_latents(latents, size[0], size[1], pipe.vae_scale_factor)

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return super().decode(pipe, self.spatial_latents(pipe, latents, size), size)


ADAPTERS = {
    Family.SD: _StableDiffusion(),
    Family.SDXL: _StableDiffusionXL(),
    Family.INSTRUCT_PIX2PIX: _InstructPix2Pix(),
    Family.SD3: _StableDiffusion3(),
    Family.FLUX: _Flux(),
}
