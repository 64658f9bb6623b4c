"""Speed-ups that leave a loaded diffusers pipeline's numbers (nearly) unchanged.

``optimize_pipeline`` is applied once, after ``load_pipeline`` and before serving; the batching engine
and the stock pipeline both keep working on the optimised pipeline.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from inference.engine_config import OptimizeConfig

#: Recompilations Dynamo allows per code object before it silently falls back to eager. The engine
#: feeds the UNet one shape per (rows, latent height, latent width) bucket: up to 3 x cap row
#: counts per image size, more than the default 8.
COMPILE_RECOMPILE_LIMIT = 256


def _attention_modules(pipe) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name in ("unet", "vae")
        if (module := getattr(pipe, name, None)) is not None and hasattr(module, "attn_processors")
    }


def attention_processors(pipe) -> dict[str, set[str]]:
    """Component name -> the class names of its attention processors (to verify SDPA is in use)."""
    return {
        name: {type(p).__name__ for p in module.attn_processors.values()}
        for name, module in _attention_modules(pipe).items()
    }


def optimize_pipeline(
    pipe,
    *,
    channels_last: bool = True,
    sdpa: bool = True,
    compile: bool = False,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Optimise ``pipe`` in place for inference; returns what was applied (for logs and benchmarks).

    - ``channels_last``: the UNet and the VAE are convolution stacks. cuDNN's fastest fp16/bf16
      convolution kernels (tensor cores) work on NHWC; with the default NCHW layout every
      convolution pays a transpose in and out. Converting the weights once makes the activations
      NHWC too (convolutions propagate the layout), so those transposes disappear. On CPU oneDNN
      also prefers NHWC. Results stay within float rounding of the NCHW ones.
    - ``sdpa``: attention through ``torch.nn.functional.scaled_dot_product_attention``
      (diffusers' ``AttnProcessor2_0``): flash / memory-efficient kernels that never materialise the
      (tokens x tokens) score matrix, which at 512 px is 4096 x 4096 per head in the UNet's first
      block. diffusers installs it by default on torch >= 2; this forces it (a pipeline may have been
      switched to another processor, e.g. the legacy ``AttnProcessor``) and the returned report lets
      the caller verify it.
    - ``compile``: ``torch.compile(unet, dynamic=False)``. Inductor fuses the UNet's many small
      element-wise ops (GroupNorm + SiLU, residual adds, time-embedding broadcasts) into few kernels
      and cuts Python/launch overhead, which matters most for small batches. ``dynamic=False``
      specialises on every input shape: the batching engine sends a different row count as its
      batch fills and drains, so each (rows, latent size) bucket compiles once on first sight
      (tens of seconds on a GPU). Warm every bucket the service will hit before taking traffic, or
      pad batches to a few fixed sizes. ``pipe.unet`` becomes an ``OptimizedModule`` (its
      attributes, such as ``config``, still resolve to the UNet). The engine's exact mode does not
      apply under compile (see ``inference.exact``).

    Apply before building a ``StepBatchingEngine`` or after: the engine reads ``pipe.unet`` at every
    step. Not undoable: load a fresh pipeline for an unoptimised reference.
    """
    report: dict[str, Any] = {"channels_last": False, "sdpa": False, "compile": False}
    if channels_last:
        for name in ("unet", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.to(memory_format=torch.channels_last)
        report["channels_last"] = True
    if sdpa:
        if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
            raise RuntimeError("sdpa=True needs torch >= 2.0 (scaled_dot_product_attention)")
        for module in _attention_modules(pipe).values():
            if not all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values()):
                module.set_attn_processor(AttnProcessor2_0())
        report["sdpa"] = True
    report["attention_processors"] = attention_processors(pipe)
    if compile:
        limit_name = (
            "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        )
        limit = getattr(torch._dynamo.config, limit_name)
        setattr(torch._dynamo.config, limit_name, max(limit, COMPILE_RECOMPILE_LIMIT))
        pipe.unet = torch.compile(pipe.unet, dynamic=False, mode=compile_mode)
        report["compile"] = compile_mode or "default"
    return report


def apply_optimize_config(pipe, config: OptimizeConfig) -> dict[str, Any]:
    """Apply a model's configured ``optimize`` block (SDPA always; see ``OptimizeConfig``)."""
    return optimize_pipeline(
        pipe,
        channels_last=config.channels_last,
        sdpa=True,
        compile=config.compile != "off",
        compile_mode=None if config.compile in ("off", "default") else config.compile,
    )
