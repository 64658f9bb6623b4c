"""Vectorised scheduler steps: one tensor op for all samples instead of one ``step()`` per sample.

Each sample keeps its own scheduler object (the universal path that works for any scheduler); for
the stateless DDIM (eta = 0) and first-order Euler we compute every sample's update at once from
per-sample coefficient vectors. The arithmetic follows diffusers' ``step`` operation by operation
in float32, so in float32 results are bitwise equal to the per-sample path (a unit test holds us to
that). Half-precision latents are stepped in float32 too and rounded once at the end: the stock
step rounds after every operation, with rules that differ between CPU and CUDA kernels (a float32
scalar times a half tensor is rounded to half first on CPU, a division is not), so the fast path
stays within one or two half-precision ulps per step of it. Exact mode steps each sample with its
own scheduler instead (see ``StepBatchingEngine``).
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler


def _column(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack([v.reshape(()) for v in values]).to(like.device).view(-1, 1, 1, 1)


def _ddim_ready(scheduler) -> bool:
    config = scheduler.config
    return (
        type(scheduler) is DDIMScheduler
        and config.prediction_type in ("epsilon", "v_prediction")
        and not config.thresholding
        and not config.clip_sample
    )


def _euler_ready(scheduler) -> bool:
    config = scheduler.config
    return (
        type(scheduler) is EulerDiscreteScheduler
        and config.prediction_type in ("epsilon", "v_prediction")
        and scheduler.step_index is not None
    )


def _ddim(samples, guided: list[torch.Tensor]) -> None:
    alphas, alphas_prev = [], []
    for sample in samples:
        scheduler, t = sample.scheduler, int(sample.timestep)
        prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        alphas.append(scheduler.alphas_cumprod[t])
        alphas_prev.append(scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod)
    out_dtype = samples[0].latents.dtype
    eps = torch.cat(guided).to(torch.float32)
    sample_batch = torch.cat([s.latents for s in samples]).to(torch.float32)
    alpha_t, alpha_prev = _column(alphas, eps).to(eps.dtype), _column(alphas_prev, eps).to(eps.dtype)
    beta_t = 1 - alpha_t
    if samples[0].scheduler.config.prediction_type == "epsilon":
        pred_original = (sample_batch - beta_t ** (0.5) * eps) / alpha_t ** (0.5)
        pred_epsilon = eps
    else:
        pred_original = (alpha_t**0.5) * sample_batch - (beta_t**0.5) * eps
        pred_epsilon = (alpha_t**0.5) * eps + (beta_t**0.5) * sample_batch
    std_dev_t = torch.zeros_like(alpha_t)  # eta = 0: DDIM is deterministic
    direction = (1 - alpha_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev = (alpha_prev ** (0.5) * pred_original + direction).to(out_dtype)
    for sample, latents in zip(samples, prev.split(1), strict=True):
        sample.latents = latents


def _euler(samples, guided: list[torch.Tensor]) -> None:
    out_dtype = samples[0].latents.dtype
    eps = torch.cat(guided).to(torch.float32)
    sample_batch = torch.cat([s.latents for s in samples]).to(torch.float32)
    sigma = _column([s.scheduler.sigmas[s.scheduler.step_index] for s in samples], sample_batch)
    sigma_next = _column([s.scheduler.sigmas[s.scheduler.step_index + 1] for s in samples], sample_batch)
    sigma_hat = sigma * (0.0 + 1)  # s_churn = 0: gamma is 0
    if samples[0].scheduler.config.prediction_type == "epsilon":
        pred_original = sample_batch - sigma_hat * eps
    else:
        pred_original = eps * (-sigma / (sigma**2 + 1) ** 0.5) + (sample_batch / (sigma**2 + 1))
    derivative = (sample_batch - pred_original) / sigma_hat
    dt = sigma_next - sigma_hat
    prev = (sample_batch + derivative * dt).to(out_dtype)
    for sample, latents in zip(samples, prev.split(1), strict=True):
        sample.latents = latents
        sample.scheduler._step_index += 1


def _flow_ready(scheduler) -> bool:
    return (
        type(scheduler) is FlowMatchEulerDiscreteScheduler
        and not scheduler.config.stochastic_sampling
        and scheduler.step_index is not None
    )


def _flow_euler(samples, guided: list[torch.Tensor]) -> None:
    """Flow-matching Euler: ``x + (σ_next − σ)·v`` per sample, one multiply-add for the batch."""
    out_dtype = samples[0].latents.dtype
    velocity = torch.cat(guided).to(torch.float32)
    sample_batch = torch.cat([s.latents for s in samples]).to(torch.float32)
    steps = [s.scheduler.step_index for s in samples]
    sigma = torch.stack([s.scheduler.sigmas[i] for s, i in zip(samples, steps, strict=True)])
    sigma_next = torch.stack([s.scheduler.sigmas[i + 1] for s, i in zip(samples, steps, strict=True)])
    dt = (sigma_next - sigma).to(sample_batch.device).view(-1, *([1] * (sample_batch.dim() - 1)))
    prev = (sample_batch + dt * velocity).to(out_dtype)
    for sample, latents in zip(samples, prev.split(1), strict=True):
        sample.latents = latents
        sample.scheduler._step_index += 1


def vectorised_step(samples, guided: list[torch.Tensor]) -> bool:
    """Step all samples at once if all use DDIM, all Euler or all flow-matching Euler; False means
    'do it per sample'."""
    if all(_ddim_ready(s.scheduler) for s in samples):
        _ddim(samples, guided)
        return True
    if all(_euler_ready(s.scheduler) for s in samples):
        _euler(samples, guided)
        return True
    if all(_flow_ready(s.scheduler) for s in samples):
        _flow_euler(samples, guided)
        return True
    return False
