"""One GPU check sized for a short loan (one H100/H200, at most ~8 minutes): correctness, speed, one table.

Random weights throughout (``benchmarks/gpu_sd15.py`` explains why that is enough for throughput);
the SD1.5 architecture comes from ``benchmarks/sd15_configs/``, SDXL's from ``benchmarks/sdxl_configs/``.
Every section checks the time left of ``--budget-s`` (counted from the start of the process) and an
optional section that would not fit is skipped and says so in the table. In order:

(a) fp16 correctness (always runs): a few mixed requests (strength, steps, guidance; one with guidance
    1.0, i.e. no CFG) through ``StepBatchingEngine`` (cap 8, all at t=0) against ``run_stock`` in the same
    dtype; the noise floor is stock fp32 vs stock fp16 on the same requests. PASS under the unit tests'
    contract (``tests/unit/test_engine_precision.py``): engine vs fp32 ≤ 1.5x floor and engine vs stock
    ≤ 2.5x floor, outputs finite. Exact mode (``EngineConfig(exact=True)``) max |Δ| is reported too:
    0 on CPU, on CUDA whatever cuBLAS/cuDNN's batch-dependent algorithms leave. The pipelines are
    checked as (b) times them: channels_last + SDPA; the fp32 reference runs without TF32.
(b) images/s at the run's size (CUDA: 512², 20 steps, strength 0.8, 16 requests), on one pipeline with
    channels_last + SDPA (``optimize_pipeline``, no compile): the stock pipeline one request at a time
    (mixed workload), the stock pipeline grouped (ONE call of N images with identical parameters), the
    engine at cap 8 on the mixed workload (strength 0.5-1.0, steps 0.5-1.5x, guidance 1-9); then the
    engine on a freshly built pipeline with ``torch.compile`` (UNet calls padded to row buckets and
    ``warm_up()`` when the engine has them, then warmed on the identical workload before timing;
    Dynamo graphs compiled during the timed run are counted: 0 = nothing compiled on the clock).
(c) the UNet's share of the device's peak: per run (useful FLOPs / UNet time; padding rows count as
    waste) and for single UNet calls of 2 and 16 rows (16 rows = 8 CFG samples) at the run's latent
    size, eager and (when compiled) compiled. FLOPs and peaks come from ``benchmarks.gpu_sd15``.
(d) if time allows, the SDXL architecture (CUDA: 1024²): stock one at a time vs the engine.

The table is printed last, and rewritten after every section to ``--table``/``--json`` when given (a run
killed at its time limit still leaves what it measured).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --device cpu     # tiny models, ~10 s
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_check.py --device cpu --arch real --size 64 \
        --check-size 64 --skip eager,unet                                   # real SD1.5 (a): ~8 min

On the GPU machine (CUDA defaults: real architectures, fp16, budget 420 s), after
``make gpu-wheels`` here and with ``.whl`` carried: ``bash scripts/gpu_check_remote.sh`` (about 7.5
minutes in all; give it a 540 s limit). ``--skip compile`` or ``--skip sdxl`` trade one section for
the others' time.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from PIL import Image  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from benchmarks.gpu_sd15 import (  # noqa: E402
    PROMPTS,
    Run,
    UNetTimer,
    build_sd15,
    clip_text_config,
    default_peak,
    device_label,
    dynamo_graphs,
    sync,
    unet_flops_per_sample_step,
)
from inference import engine_config  # noqa: E402
from inference.engine import EngineConfig, StepBatchingEngine  # noqa: E402
from inference.models import Family  # noqa: E402
from inference.optimize import optimize_pipeline  # noqa: E402
from inference.pipelines import run_stock  # noqa: E402
from inference.tiny import build_tiny_pipeline, build_tokenizer  # noqa: E402
from inference.types import GenerationRequest  # noqa: E402

SDXL_CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_configs"
NEGATIVE_PROMPTS = ("blurry", "low quality", "text, watermark", "")
#: The mixed workload: strength, a factor on --steps, guidance (1.0 = no CFG: a one-row sample).
STRENGTHS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STEP_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5)
GUIDANCES = (1.0, 3.0, 5.0, 7.5, 9.0)
#: (a)'s requests: (strength, factor on --check-steps, guidance); the second one runs without CFG.
CHECK_MIX = ((0.8, 1.0, 7.5), (1.0, 0.5, 1.0), (0.5, 1.5, 4.0), (0.65, 1.0, 9.0), (0.9, 0.75, 3.0))
#: The unit tests' half-precision contract (tests/unit/test_engine_precision.py), x the noise floor.
ENGINE_VS_FLOAT32 = 1.5
ENGINE_VS_STOCK = ENGINE_VS_FLOAT32 + 1
FLOOR_CEILING = {"float16": 0.02, "bfloat16": 0.15}  # above it the "floor" is not rounding noise
TARGET_ENGINE_VS_STOCK = 3.0  # engine images/s >= 3x stock one at a time (SD1.5, 512²)
TARGET_UNET_SHARE = 0.40  # a 16-row UNet call at >= 40% of the device's peak
SECTIONS = ("eager", "unet", "compile", "sdxl")
DEFAULTS = {  # device type -> knobs; CPU runs tiny models so the whole check takes seconds
    "cuda": {
        "arch": "real",
        "dtype": "float16",
        "size": 512,
        "steps": 20,
        "requests": 16,
        "check_size": 512,
        "check_steps": 20,
        "check_requests": 4,
        "sdxl_size": 1024,
        "sdxl_requests": 6,
        "bench_iters": 10,
        "skip": "",
    },
    "cpu": {
        "arch": "tiny",
        "dtype": "float16",
        "size": 128,
        "steps": 4,
        "requests": 3,
        "check_size": 128,
        "check_steps": 4,
        "check_requests": 3,
        "sdxl_size": 128,
        "sdxl_requests": 2,
        "bench_iters": 2,
        "skip": "compile",
    },
}


class OutOfTime(Exception):
    """A run would end past its deadline (checked between requests / engine steps)."""


# ---- time budget and the table ---------------------------------------------------------------------


@dataclass
class Budget:
    seconds: float
    started: float

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def deadline(self, reserve: float) -> float:
        """Absolute perf_counter time by which work must stop to leave ``reserve`` seconds."""
        return self.started + self.seconds - reserve


@dataclass
class Row:
    section: str
    measure: str
    value: str
    target: str = ""
    status: str = ""


@dataclass
class Report:
    args: argparse.Namespace
    budget: Budget
    rows: list[Row] = field(default_factory=list)
    figures: dict[str, dict] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)

    def add(self, section: str, measure: str, value: str, target: str = "", status: str = "") -> None:
        self.rows.append(Row(section, measure, value, target, status))
        line = f"{value} {target} {status}".strip()
        log(self.budget, f"({section}) {measure}: {line}")

    def skip(self, section: str, measure: str, reason: str) -> None:
        self.add(section, measure, "—", "", f"SKIPPED: {reason}")

    def error(self, section: str, measure: str, exc: BaseException) -> None:
        self.add(section, measure, "—", "", f"ERROR: {type(exc).__name__}: {str(exc)[:160]}")
        traceback.print_exc()

    def table(self) -> str:
        lines = ["| # | measure | value | target / ratio | status |", "|---|---|---|---|---|"]
        for row in self.rows:
            cells = (row.section, row.measure, row.value, row.target, row.status)
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)

    def write(self) -> None:
        """(Re)write --table and --json: called after every section."""
        if self.args.table:
            self.args.table.write_text(self.table() + "\n", encoding="utf-8")
        if self.args.json:
            out = {
                "config": {k: str(v) for k, v in vars(self.args).items()},
                "info": self.info,
                "elapsed_s": self.budget.elapsed(),
                "budget_s": self.budget.seconds,
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "figures": self.figures,
            }
            self.args.json.write_text(json.dumps(out, indent=2, default=str), encoding="utf-8")


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f}s] {message}", flush=True)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if x != x:  # NaN
        return "NaN"
    if x == 0:
        return "0"
    if abs(x) < 1e-2 or abs(x) >= 1e4:
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


# ---- models -----------------------------------------------------------------------------------------


def _finish(pipe, device: torch.device, dtype: torch.dtype):
    diffusers.utils.logging.set_verbosity_error()
    pipe.to(device=device, dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_config(name: str) -> dict:
    return json.loads((SDXL_CONFIG_DIR / name).read_text(encoding="utf-8"))


def build_sdxl(device: torch.device, dtype: torch.dtype, seed: int) -> StableDiffusionXLImg2ImgPipeline:
    """SDXL base's architecture (UNet 2.6B, CLIP-L + OpenCLIP bigG, VAE) with random weights."""
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()  # stand-in vocabulary, 77 tokens

    def text_config(name: str) -> CLIPTextConfig:
        return clip_text_config(_sdxl_config(name), tokenizer)

    with torch.device(device):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config("text_encoder.json"))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2.json"))
        torch.manual_seed(seed + 2)
        vae = AutoencoderKL.from_config(_sdxl_config("vae.json"))
        torch.manual_seed(seed + 3)
        unet = UNet2DConditionModel.from_config(_sdxl_config("unet.json"))
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(_sdxl_config("scheduler.json")),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _finish(pipe, device, dtype)


def build(family: Family, arch: str, device: torch.device, dtype: torch.dtype, seed: int):
    if arch == "tiny":
        return _finish(build_tiny_pipeline(family, seed=seed), device, dtype)
    if family is Family.SDXL:
        return build_sdxl(device, dtype, seed)
    return build_sd15(device, dtype, seed)


def params_m(pipe) -> str:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    counts = {
        n: sum(p.numel() for p in m.parameters()) / 1e6
        for n in names
        if isinstance(m := getattr(pipe, n, None), torch.nn.Module)
    }
    return ", ".join(f"{n} {v:.0f}M" for n, v in counts.items())


def unet_flops_per_row(pipe, latent: int) -> float:
    """FLOPs of one UNet row (a CFG sample is 2 rows) at ``latent``²; SD from gpu_sd15, SDXL here."""
    unet = pipe.unet
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return unet_flops_per_sample_step(pipe, latent) / 2
    device, dtype, config = pipe.device, unet.dtype, unet.config
    text_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = (config.projection_class_embeddings_input_dim - text_dim) // config.addition_time_embed_dim
    sample = torch.randn(2, config.in_channels, latent, latent, device=device, dtype=dtype)
    hidden = torch.randn(2, 77, config.cross_attention_dim, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(2, text_dim, device=device, dtype=dtype),
        "time_ids": torch.randn(2, time_ids, device=device, dtype=dtype),
    }
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        unet(sample, torch.tensor([500, 500], device=device), hidden, added_cond_kwargs=added)
    return counter.get_total_flops() / 2


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 inside (cuDNN convolutions use it by default): the float32 reference is float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def release() -> None:
    """Free what nothing references any more (drop the references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- workloads --------------------------------------------------------------------------------------


def source_image(size: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_request(i: int, tag: str, image, seed: int, strength: float, steps: int, guidance: float):
    return GenerationRequest(
        request_id=f"{tag}{i}",
        model="random-weights",
        prompt=f"{PROMPTS[i % len(PROMPTS)]}, variation {i}",
        negative_prompt=NEGATIVE_PROMPTS[i % len(NEGATIVE_PROMPTS)],
        image=image,
        seed=seed * 10_000 + i,
        strength=strength,
        steps=max(1, steps),
        guidance_scale=guidance,
        image_guidance_scale=1.5,
    )


def mixed_requests(count: int, size: int, steps: int, seed: int, tag: str) -> list[GenerationRequest]:
    rng, image = random.Random(seed), source_image(size, seed)
    out = []
    for i in range(count):
        strength, factor, guidance = rng.choice(STRENGTHS), rng.choice(STEP_FACTORS), rng.choice(GUIDANCES)
        out.append(make_request(i, tag, image, seed, strength, round(steps * factor), guidance))
    return out


def check_requests(args) -> list[GenerationRequest]:
    image = source_image(args.check_size, args.seed + 1)
    mix = CHECK_MIX[: args.check_requests]
    return [
        make_request(i, "check", image, args.seed + 1, s, round(args.check_steps * f), g)
        for i, (s, f, g) in enumerate(mix)
    ]


def sample_steps(requests) -> int:
    return sum(max(int(r.steps * r.strength), 1) for r in requests)


def row_steps(requests) -> int:
    """UNet rows x steps the workload needs: CFG (guidance > 1) doubles the rows, as in diffusers."""
    return sum((2 if r.guidance_scale > 1 else 1) * max(int(r.steps * r.strength), 1) for r in requests)


def renamed(requests, prefix: str, **changes) -> list[GenerationRequest]:
    return [dataclasses.replace(r, request_id=prefix + r.request_id, **changes) for r in requests]


# ---- runs -------------------------------------------------------------------------------------------


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise OutOfTime(what)


def run_stock_each(pipe, family: Family, requests, device, deadline: float | None = None) -> Run:
    """The stock pipeline, one request at a time (the oracle path, ``run_stock``)."""
    run, timer = Run(), UNetTimer(pipe.unet, device)
    try:
        sync(device)
        start = time.perf_counter()
        for r in requests:
            _check_deadline(deadline, f"stock one at a time, {len(run.images)}/{len(requests)} done")
            run.images[r.request_id] = run_stock(pipe, family, r, 0, "np")
            run.finished[r.request_id] = time.perf_counter() - start
            run.batches.append(1)
        sync(device)
        run.wall_s = time.perf_counter() - start
        run.unet_s = timer.seconds()
    finally:
        timer.remove()
    return run


def run_stock_grouped(pipe, requests, device) -> Run:
    """ONE stock call of N images with identical parameters (the first request's), N prompts/seeds."""
    first = requests[0]
    run, timer = Run(), UNetTimer(pipe.unet, device)
    try:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = pipe(
                prompt=[r.prompt for r in requests],
                negative_prompt=[r.negative_prompt or "" for r in requests],
                image=[r.image for r in requests],
                strength=first.strength,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
                output_type="np",
            )
        sync(device)
        run.wall_s = time.perf_counter() - start
        run.unet_s = timer.seconds()
    finally:
        timer.remove()
    for r, image in zip(requests, out.images, strict=True):
        run.images[r.request_id] = image
        run.finished[r.request_id] = run.wall_s
    run.batches.append(len(requests))
    return run


def run_engine(
    engine: StepBatchingEngine,
    pipe,
    requests,
    device,
    deadline: float | None = None,
    on_step: Callable[[object], None] | None = None,
) -> Run:
    """Everything submitted at t=0, then ``step()`` until idle (stops with OutOfTime at ``deadline``)."""
    run, timer = Run(), UNetTimer(pipe.unet, device)
    padded = 0
    try:
        sync(device)
        start = time.perf_counter()
        for r in requests:
            engine.submit(r)
        while engine.has_work:
            _check_deadline(deadline, f"engine, {len(run.images)}/{len(requests)} done")
            outcomes, stats = engine.step()
            for outcome in outcomes:
                if outcome.result is None:
                    raise RuntimeError(f"engine failed {outcome.request_id}: {outcome.error}")
                run.finished[outcome.request_id] = time.perf_counter() - start
                run.images[outcome.request_id] = outcome.result.images[0]
            if stats is not None:
                run.batches.append(stats.samples)
                padded += getattr(stats, "padded_rows", 0)
                run.buckets.add((stats.rows + getattr(stats, "padded_rows", 0), *stats.bucket))
                if on_step is not None:
                    on_step(stats)
        sync(device)
        run.wall_s = time.perf_counter() - start
        run.unet_s = timer.seconds()
    finally:
        timer.remove()
        if deadline is not None and engine.has_work:  # leave the engine idle for the next run
            for r in requests:
                engine.cancel(r.request_id)
            while engine.has_work:
                engine.step()
    run.padded_rows = padded
    return run


def max_diff(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return float(
        max(np.abs(got[k].astype(np.float64) - expected[k].astype(np.float64)).max() for k in expected)
    )


def finite(images: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in images.values())


def figures(run: Run, requests, flops_per_row: float, peak_tflops: float | None) -> dict:
    useful = flops_per_row * row_steps(requests)
    achieved = useful / run.unet_s if run.unet_s else float("nan")
    return {
        "images": len(requests),
        "images_per_s": len(requests) / run.wall_s,
        "sample_steps": sample_steps(requests),
        "sample_steps_per_s": sample_steps(requests) / run.wall_s,
        "wall_s": run.wall_s,
        "unet_s": run.unet_s,
        "unet_share_of_wall": run.unet_s / run.wall_s if run.wall_s else None,
        "mean_batch": float(np.mean(run.batches)) if run.batches else None,
        "padded_rows": getattr(run, "padded_rows", 0),
        "unet_tflops_per_s": achieved / 1e12,
        "share_of_peak": achieved / (peak_tflops * 1e12) if peak_tflops else None,
    }


def speed(f: dict) -> str:
    return (
        f"{fmt(f['images_per_s'])} img/s ({f['images']} img, {fmt(f['sample_steps_per_s'])} sample-steps/s)"
    )


def unet_speed(f: dict) -> str:
    share = f["share_of_peak"]
    peak = f", {100 * share:.1f}% of peak" if share is not None else ""
    wall = 100 * (f["unet_share_of_wall"] or 0)
    return f"{fmt(f['unet_tflops_per_s'])} TFLOP/s{peak}; UNet {wall:.0f}% of wall"


def bench_unet_call(pipe, rows: int, latent: int, iters: int, device) -> float:
    """Seconds per UNet call of ``rows`` rows, called as the engine calls it (same dtypes, kwargs)."""
    unet, config = pipe.unet, pipe.unet.config
    dtype = pipe.text_encoder.dtype
    kwargs = {
        "encoder_hidden_states": torch.randn(rows, 77, config.cross_attention_dim, device=device, dtype=dtype)
    }
    added = None
    if getattr(config, "addition_embed_type", None) == "text_time":
        text_dim = pipe.text_encoder_2.config.projection_dim
        n_time = (config.projection_class_embeddings_input_dim - text_dim) // config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(rows, text_dim, device=device, dtype=dtype),
            "time_ids": torch.randn(rows, n_time, device=device, dtype=dtype),
        }
    sample = torch.randn(rows, config.in_channels, latent, latent, device=device, dtype=dtype)
    timesteps = torch.full((rows,), 500, device=device, dtype=torch.long)
    with torch.inference_mode():
        for _ in range(2):
            unet(sample, timesteps, added_cond_kwargs=added, return_dict=False, **kwargs)
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            unet(sample, timesteps, added_cond_kwargs=added, return_dict=False, **kwargs)
        sync(device)
    return (time.perf_counter() - start) / iters


# ---- the engine's compile support, whichever form it has ------------------------------------------


def bucketed_engine(pipe, family: Family, cap: int, buckets: tuple[int, ...], size: int):
    """An engine whose UNet calls are padded to ``buckets`` if the engine supports row buckets.

    Returns (engine, how): the current engine takes ``optimize=OptimizeConfig(row_buckets=...,
    warmup_sizes=...)``; an older draft took ``row_buckets=`` directly; without either, no padding.
    """
    params = inspect.signature(StepBatchingEngine.__init__).parameters
    config = EngineConfig(max_batch_samples=cap)
    optimize_cls = getattr(engine_config, "OptimizeConfig", None)
    if "optimize" in params and optimize_cls is not None:
        fields = {f.name for f in dataclasses.fields(optimize_cls)}
        kwargs: dict[str, object] = {"row_buckets": buckets}
        if "warmup_sizes" in fields:
            kwargs["warmup_sizes"] = ((size, size),)
        if "compile" in fields:
            kwargs["compile"] = "default"
        if "channels_last" in fields:
            kwargs["channels_last"] = True
        optimize = optimize_cls(**kwargs)
        engine = StepBatchingEngine(pipe, family, config, optimize=optimize, output_type="np")
        return engine, f"row buckets {list(buckets)} (OptimizeConfig)"
    if "row_buckets" in params:
        engine = StepBatchingEngine(pipe, family, config, row_buckets=buckets, output_type="np")
        return engine, f"row buckets {list(buckets)}"
    return StepBatchingEngine(pipe, family, config, output_type="np"), "no row buckets (engine has none)"


def call_warm_up(engine, size: int, deadline: float) -> int | None:
    """``engine.warm_up`` in whichever signature it has; None when the engine has no warm-up.

    Where it reports progress, it is stopped (OutOfTime) once the shapes still to compile, at the
    pace so far, would end past ``deadline``.
    """
    warm_up = getattr(engine, "warm_up", None)
    if warm_up is None:
        return None
    params = inspect.signature(warm_up).parameters
    kwargs: dict[str, object] = {}
    if "on_progress" in params:
        started = time.perf_counter()

        def on_progress(done: int, total: int) -> None:
            now = time.perf_counter()
            pace = (now - started) / max(done, 1)
            if done < total and now + pace * (total - done) > deadline:
                raise OutOfTime(
                    f"warm_up: {done}/{total} shapes in {now - started:.0f} s; the rest would need "
                    f"~{pace * (total - done):.0f} s"
                )

        kwargs["on_progress"] = on_progress
    if "sizes" in params:
        return warm_up([(size, size)], **kwargs)
    return warm_up(**kwargs)


# ---- sections ---------------------------------------------------------------------------------------


@dataclass
class State:
    """What the sections hand on to each other."""

    pipe: object = None
    flops_per_row: float = 0.0
    peak: float | None = None
    eager: dict[str, dict] = field(default_factory=dict)
    eager_buckets: set = field(default_factory=set)
    engine_eager_wall: float | None = None
    compiled_pipe: object = None


def section_correctness(report: Report, state: State, device, dtype) -> bool:
    args, budget = report.args, report.budget
    requests = check_requests(args)
    desc = ", ".join(f"s{r.strength}/{r.steps}st/g{r.guidance_scale}" for r in requests)
    log(budget, f"(a) building {args.arch} SD ({'fp32 + ' if dtype != torch.float32 else ''}{args.dtype})")
    reference = build(Family.SD, args.arch, device, torch.float32, args.seed)
    report.info["sd_params"] = params_m(reference)
    if dtype == torch.float32:
        pipe = reference
    else:
        pipe = copy.deepcopy(reference)
        _finish(pipe, device, dtype)
    state.pipe = pipe
    # (a) checks the pipeline as (b) times it. On CPU this also matters for speed: half-precision
    # convolutions in NCHW take a slow path there, channels_last ones do not.
    for component in (reference, pipe) if reference is not pipe else (pipe,):
        optimize_pipeline(component, channels_last=True, sdpa=True, compile=False)
    log(budget, f"(a) built: {report.info['sd_params']}; requests {desc} at {args.check_size}²")
    with full_float32():
        stock32 = {r.request_id: run_stock(reference, Family.SD, r, 0, "np") for r in requests}
    stock = {r.request_id: run_stock(pipe, Family.SD, r, 0, "np") for r in requests}
    cap = EngineConfig(max_batch_samples=args.cap)
    got = run_engine(StepBatchingEngine(pipe, Family.SD, cap, output_type="np"), pipe, requests, device)
    exact_config = EngineConfig(max_batch_samples=args.cap, exact=True)
    exact = run_engine(
        StepBatchingEngine(pipe, Family.SD, exact_config, output_type="np"), pipe, requests, device
    )
    del reference
    release()
    floor = max_diff(stock, stock32)
    vs_stock, vs_float32, vs_exact = (
        max_diff(got.images, stock),
        max_diff(got.images, stock32),
        max_diff(exact.images, stock),
    )
    ok_finite = finite(stock) and finite(got.images) and finite(stock32)
    ceiling = FLOOR_CEILING.get(args.dtype)
    ok = (
        ok_finite
        and vs_stock <= ENGINE_VS_STOCK * floor
        and vs_float32 <= ENGINE_VS_FLOAT32 * floor
        and (floor > 0 or dtype == torch.float32)
    )
    floor_note = "" if ceiling is None or floor <= ceiling else f"above {ceiling}: not rounding noise"
    sec = "a"
    report.add(
        sec,
        f"noise floor: max abs Δ stock fp32 vs {args.dtype} ({len(requests)} req, {args.check_size}²)",
        fmt(floor),
        f"≤ {ceiling}" if ceiling else "",
        "" if ok_finite else "NaN/inf in outputs",
    )
    report.add(
        sec,
        f"max abs Δ engine vs stock {args.dtype}, cap {args.cap}, all at t=0",
        fmt(vs_stock),
        f"{fmt(vs_stock / floor if floor else float('nan'))}x floor; ≤ {ENGINE_VS_STOCK}x",
        "PASS" if ok else "FAIL",
    )
    report.add(
        sec,
        "max abs Δ engine vs stock fp32",
        fmt(vs_float32),
        f"{fmt(vs_float32 / floor if floor else float('nan'))}x floor; ≤ {ENGINE_VS_FLOAT32}x",
        floor_note,
    )
    if device.type == "cpu":
        exact_target, exact_status = "0 on CPU", "MATCH" if vs_exact == 0 else "DIFFERS (expected 0 on CPU)"
    else:
        exact_target, exact_status = "info (0 on CPU)", ""
    report.add(
        sec, f"max abs Δ engine exact vs stock {args.dtype}", fmt(vs_exact), exact_target, exact_status
    )
    report.figures["correctness"] = {
        "floor": floor,
        "engine_vs_stock": vs_stock,
        "engine_vs_float32": vs_float32,
        "exact_vs_stock": vs_exact,
        "finite": ok_finite,
        "pass": ok,
        "requests": desc,
    }
    return ok


def section_eager(report: Report, state: State, device) -> None:
    args, budget = report.args, report.budget
    pipe, sec = state.pipe, "b"
    applied = optimize_pipeline(pipe, channels_last=True, sdpa=True, compile=False)
    report.info["eager_optimisations"] = {k: str(v) for k, v in applied.items()}
    latent = args.size // 8
    state.flops_per_row = unet_flops_per_row(pipe, latent)
    mixed = mixed_requests(args.requests, args.size, args.steps, args.seed, "m")
    uniform = [
        make_request(i, "u", mixed[0].image, args.seed, args.strength, args.steps, args.guidance)
        for i in range(args.requests)
    ]
    report.info["mixed_workload"] = [(r.strength, r.steps, r.guidance_scale) for r in mixed]
    deadline = budget.deadline(args.reserve_s)
    log(
        budget,
        f"(b) {args.requests} requests at {args.size}²: mixed {sample_steps(mixed)} sample-steps, "
        f"uniform {sample_steps(uniform)}; UNet {fmt(state.flops_per_row * 2 / 1e9)} GFLOP per CFG step",
    )
    runs: dict[str, tuple[Run, list]] = {}

    # stock, one request at a time: warm the CFG and the no-CFG shapes, then the mixed workload
    warm = [dataclasses.replace(mixed[0], request_id="w0", steps=2, strength=1.0, guidance_scale=7.5)]
    warm.append(dataclasses.replace(warm[0], request_id="w1", guidance_scale=1.0))
    run_stock_each(pipe, Family.SD, warm, device)
    runs["stock_one"] = (run_stock_each(pipe, Family.SD, mixed, device, deadline), mixed)
    stock_one = figures(*runs["stock_one"], state.flops_per_row, state.peak)
    report.add(sec, f"stock, one at a time (mixed, {args.requests} req)", speed(stock_one))

    # stock, grouped: one call of N identical-parameter images
    _check_deadline(deadline, "stock grouped")
    run_stock_grouped(pipe, renamed(uniform, "w", steps=2, strength=1.0), device)
    runs["stock_grouped"] = (run_stock_grouped(pipe, uniform, device), uniform)
    grouped = figures(*runs["stock_grouped"], state.flops_per_row, state.peak)
    report.add(
        sec,
        f"stock grouped: 1 call × {args.requests} img (s{args.strength}, {args.steps} st, g{args.guidance})",
        speed(grouped),
    )

    # the engine at cap 8, mixed workload, warmed on the identical workload
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=args.cap), output_type="np")
    run_engine(engine, pipe, renamed(mixed, "w"), device, deadline)
    engine_run = run_engine(engine, pipe, mixed, device, deadline)
    runs["engine"] = (engine_run, mixed)
    state.eager_buckets = engine_run.buckets
    state.engine_eager_wall = engine_run.wall_s
    eng = figures(engine_run, mixed, state.flops_per_row, state.peak)
    ratio_one = eng["images_per_s"] / stock_one["images_per_s"]
    ratio_grouped = eng["images_per_s"] / grouped["images_per_s"]
    norm_grouped = eng["sample_steps_per_s"] / grouped["sample_steps_per_s"]
    target_applies = args.arch == "real" and args.size == 512
    met = ratio_one >= TARGET_ENGINE_VS_STOCK
    report.add(sec, f"engine cap {args.cap}, eager (mixed, mean batch {fmt(eng['mean_batch'])})", speed(eng))
    report.add(
        sec,
        "ratio engine / stock one at a time",
        f"{ratio_one:.2f}x",
        f"target ≥ {TARGET_ENGINE_VS_STOCK:g}x (SD1.5, 512²)",
        ("MET" if met else "MISSED") if target_applies else "target is for SD1.5 at 512²",
    )
    report.add(
        sec,
        "ratio engine (mixed) / stock grouped (uniform)",
        f"{ratio_grouped:.2f}x",
        f"per sample-step: {norm_grouped:.2f}x",
    )
    for name, (run, requests) in runs.items():
        report.figures[f"sd_{name}"] = figures(run, requests, state.flops_per_row, state.peak)
    report.figures["sd_ratios"] = {
        "engine_over_stock_one": ratio_one,
        "engine_over_stock_grouped": ratio_grouped,
        "engine_over_stock_grouped_per_sample_step": norm_grouped,
    }
    state.eager = {name: report.figures[f"sd_{name}"] for name in runs}
    for name, label in (("stock_one", "stock one at a time"), ("stock_grouped", "stock grouped")):
        report.add("c", f"UNet in run: {label}", unet_speed(state.eager[name]))
    report.add("c", "UNet in run: engine eager", unet_speed(state.eager["engine"]))


def section_unet_calls(report: Report, state: State, device, pipe, label: str, rows_list) -> None:
    args = report.args
    latent = args.size // 8
    for rows in rows_list:
        seconds = bench_unet_call(pipe, rows, latent, args.bench_iters, device)
        achieved = state.flops_per_row * rows / seconds
        share = achieved / (state.peak * 1e12) if state.peak else None
        value = f"{fmt(achieved / 1e12)} TFLOP/s ({1000 * seconds:.1f} ms/call)"
        target, status = "", ""
        if rows == 16:
            target = f"≥ {100 * TARGET_UNET_SHARE:.0f}% of peak"
            status = "n/a (no peak)" if share is None else ("MET" if share >= TARGET_UNET_SHARE else "MISSED")
        pct = "" if share is None else f"{100 * share:.1f}% of peak; "
        report.add("c", f"UNet call, {rows} rows, {latent}² latent, {label}", value, pct + target, status)
        report.figures[f"unet_call_{label}_{rows}"] = {
            "rows": rows,
            "latent": latent,
            "seconds": seconds,
            "tflops_per_s": achieved / 1e12,
            "share_of_peak": share,
        }


def section_compile(report: Report, state: State, device, dtype) -> None:
    args, budget, sec = report.args, report.budget, "b"
    pipe = build(Family.SD, args.arch, device, dtype, args.seed)
    state.compiled_pipe = pipe
    applied = optimize_pipeline(
        pipe, channels_last=True, sdpa=True, compile=True, compile_mode=args.compile_mode
    )
    report.info["compile_optimisations"] = {k: str(v) for k, v in applied.items()}
    engine, how = bucketed_engine(pipe, Family.SD, args.cap, args.row_buckets, args.size)
    mixed = mixed_requests(args.requests, args.size, args.steps, args.seed, "m")
    # The timed run must still fit after the warm-up: keep room for it (eager wall x 2) and the table.
    reserve = args.reserve_s + 2 * (state.engine_eager_wall or 0.0)
    deadline = budget.deadline(reserve)
    graphs0, started = dynamo_graphs(), time.perf_counter()
    warmed = None
    if how.startswith("row buckets"):
        log(budget, f"(b) compile: warm_up() over {how}")
        warmed = call_warm_up(engine, args.size, deadline)
        log(budget, f"(b) compile: warm_up() ran {warmed} shapes in {time.perf_counter() - started:.0f} s")
    log(budget, f"(b) compile: warm-up on the identical workload ({how})")

    if warmed is not None:
        expected: set = set()  # warm_up() compiled every bucket already
    elif how.startswith("row buckets"):
        expected = {(rows, args.size, args.size) for rows in args.row_buckets}
    else:
        expected = set(state.eager_buckets)  # the eager run hit exactly these (rows, h, w) shapes
    seen: set = set()

    def watch(stats) -> None:
        """Give up early when the buckets still to compile cannot fit before the deadline."""
        seen.add((stats.rows + getattr(stats, "padded_rows", 0), *stats.bucket))
        todo = len(expected - seen)
        if todo and dynamo_graphs() > graphs0:
            per_bucket = (time.perf_counter() - started) / len(seen & expected or seen)
            if time.perf_counter() + per_bucket * todo > deadline:
                raise OutOfTime(
                    f"{len(seen)} buckets compiled in {time.perf_counter() - started:.0f} s; {todo} more "
                    f"would need ~{per_bucket * todo:.0f} s"
                )

    run_engine(engine, pipe, renamed(mixed, "w"), device, deadline, on_step=watch)
    warm_s = time.perf_counter() - started
    graphs_warm = dynamo_graphs() - graphs0
    graphs1 = dynamo_graphs()
    timed = run_engine(engine, pipe, mixed, device, budget.deadline(args.reserve_s))
    on_clock = dynamo_graphs() - graphs1
    comp = figures(timed, mixed, state.flops_per_row, state.peak)
    report.figures["sd_engine_compiled"] = comp | {
        "warm_up_s": warm_s,
        "graphs_compiled_in_warm_up": graphs_warm,
        "graphs_compiled_while_timed": on_clock,
        "how": how,
    }
    report.add(
        sec,
        f"engine cap {args.cap}, torch.compile ({how}; warm-up {warm_s:.0f} s, {graphs_warm} graphs)",
        speed(comp),
        f"{on_clock} graphs compiled on the clock",
        "" if on_clock == 0 else "compiles were timed",
    )
    eager = state.eager.get("engine")
    if eager:
        ratio = comp["images_per_s"] / eager["images_per_s"]
        report.figures["sd_ratios"]["compile_over_eager"] = ratio
        one = comp["images_per_s"] / state.eager["stock_one"]["images_per_s"]
        report.figures["sd_ratios"]["compiled_engine_over_stock_one"] = one
        report.add(
            sec, "ratio compile / eager (engine)", f"{ratio:.2f}x", f"compiled engine / stock one: {one:.2f}x"
        )
    report.add("c", "UNet in run: engine compiled", unet_speed(comp))


def section_sdxl(report: Report, state: State, device, dtype) -> None:
    args, budget, sec = report.args, report.budget, "d"
    size = args.sdxl_size
    pipe = build(Family.SDXL, args.arch, device, dtype, args.seed)
    report.info["sdxl_params"] = params_m(pipe)
    optimize_pipeline(pipe, channels_last=True, sdpa=True, compile=False)
    flops = unet_flops_per_row(pipe, size // 8)
    mixed = mixed_requests(args.sdxl_requests, size, args.steps, args.seed + 2, "x")
    log(budget, f"(d) SDXL built ({report.info['sdxl_params']}); {len(mixed)} mixed requests at {size}²")
    deadline = budget.deadline(args.reserve_s)
    warm = [dataclasses.replace(mixed[0], request_id="w0", steps=2, strength=1.0, guidance_scale=7.5)]
    run_stock_each(pipe, Family.SDXL, warm, device, deadline)
    stock = run_stock_each(pipe, Family.SDXL, mixed, device, deadline)
    engine = StepBatchingEngine(pipe, Family.SDXL, EngineConfig(max_batch_samples=args.cap), output_type="np")
    run_engine(engine, pipe, renamed(mixed[:2], "w", steps=2), device, deadline)
    got = run_engine(engine, pipe, mixed, device, deadline)
    f_stock, f_engine = figures(stock, mixed, flops, state.peak), figures(got, mixed, flops, state.peak)
    report.figures["sdxl_stock_one"], report.figures["sdxl_engine"] = f_stock, f_engine
    ratio = f_engine["images_per_s"] / f_stock["images_per_s"]
    report.figures["sdxl_ratio_engine_over_stock_one"] = ratio
    diff = max_diff(got.images, stock.images)
    report.add(sec, f"SDXL {size}² stock, one at a time (mixed, {len(mixed)} req)", speed(f_stock))
    report.add(sec, f"SDXL {size}² engine cap {args.cap}, eager", speed(f_engine), f"{ratio:.2f}x stock one")
    report.add(sec, "SDXL UNet in run: stock / engine", f"{unet_speed(f_stock)} / {unet_speed(f_engine)}")
    note = "NaN: random fp16 weights overflow" if diff != diff else "info (random weights, fp16)"
    report.add(sec, "SDXL max abs Δ engine vs stock", fmt(diff), note)
    del pipe, engine
    release()


# ---- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--arch", choices=("real", "tiny"), help="real SD1.5/SDXL (CUDA) or tiny models (CPU)"
    )
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="default float16")
    parser.add_argument("--budget-s", type=float, default=420.0, help="hard time budget, from process start")
    parser.add_argument("--reserve-s", type=float, help="kept free at the end (CUDA 15, CPU 2)")
    parser.add_argument("--size", type=int, help="image side for (b)/(c) (CUDA 512, CPU 128)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (CUDA 20, CPU 4)")
    parser.add_argument("--strength", type=float, default=0.8, help="the grouped stock run's strength")
    parser.add_argument("--guidance", type=float, default=7.5, help="the grouped stock run's guidance")
    parser.add_argument("--requests", type=int, help="requests in (b) (CUDA 16, CPU 3)")
    parser.add_argument("--check-size", type=int, help="image side in (a) (CUDA 512, CPU 128)")
    parser.add_argument("--check-steps", type=int, help="steps in (a) (CUDA 20, CPU 4)")
    parser.add_argument("--check-requests", type=int, help=f"requests in (a), at most {len(CHECK_MIX)}")
    parser.add_argument("--sdxl-size", type=int, help="image side in (d) (CUDA 1024, CPU 128)")
    parser.add_argument("--sdxl-requests", type=int, help="requests in (d) (CUDA 6, CPU 2)")
    parser.add_argument("--cap", type=int, default=8, help="engine max_batch_samples")
    parser.add_argument("--row-buckets", default="8,16", help="UNet row buckets for the compiled engine")
    parser.add_argument("--compile-mode", help="torch.compile mode (default: Inductor's default)")
    parser.add_argument("--bench-iters", type=int, help="timed calls per UNet-call line (CUDA 10, CPU 2)")
    parser.add_argument(
        "--skip", help=f"comma-separated sections to skip, of {','.join(SECTIONS)} (CPU default: compile)"
    )
    parser.add_argument("--compile-min-s", type=float, default=150.0, help="time left needed to try compile")
    parser.add_argument("--sdxl-min-s", type=float, help="time left needed to try SDXL (CUDA 60, CPU 5)")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the dtype, TFLOP/s")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write rows and figures here (after every section)")
    parser.add_argument("--table", type=Path, help="write the markdown table here (after every section)")
    args = parser.parse_args(argv)
    defaults = DEFAULTS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    cpu = torch.device(args.device).type != "cuda"
    args.reserve_s = args.reserve_s if args.reserve_s is not None else (2.0 if cpu else 15.0)
    args.sdxl_min_s = args.sdxl_min_s if args.sdxl_min_s is not None else (5.0 if cpu else 60.0)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip() and s.strip() != "none"}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    args.row_buckets = tuple(int(b) for b in args.row_buckets.split(","))
    args.check_requests = max(1, min(args.check_requests, len(CHECK_MIX)))
    for name in ("size", "check_size", "sdxl_size"):
        if getattr(args, name) % 8:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of 8")
    return args


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    """Run the check; the budget counts from ``started`` (the process start when run as a script)."""
    args = parse_args(argv)
    budget = Budget(args.budget_s, time.perf_counter() if started is None else started)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    report = Report(args, budget)
    state = State(peak=args.peak_tflops or default_peak(device, dtype))
    label = device_label(device)
    report.info |= {
        "device": label,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": sys.version.split()[0],
        "peak_tflops": state.peak,
    }
    log(budget, f"gpu_check on {label}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    report.add("–", "device", f"{label}; torch {torch.__version__}, diffusers {diffusers.__version__}")
    arch = "SD1.5/SDXL architectures, random weights" if args.arch == "real" else "tiny random models"
    report.add("–", "dtype / models", f"{args.dtype}; {arch}; peak {fmt(state.peak)} TFLOP/s")

    ok = False
    try:
        ok = section_correctness(report, state, device, dtype)
    except Exception as exc:  # the table must still come out
        report.error("a", "fp16 correctness", exc)
    report.write()

    def optional(name: str, measure: str, need_s: float, run: Callable[[], None], sec: str) -> bool:
        if name in args.skip:
            report.skip(sec, measure, f"--skip {name}")
            return False
        if state.pipe is None and name != "sdxl":
            report.skip(sec, measure, "no SD pipeline (section a failed to build it)")
            return False
        if budget.left() - args.reserve_s < need_s:
            report.skip(sec, measure, f"budget: {budget.left():.0f} s left, needs ~{need_s:.0f} s")
            return False
        try:
            run()
            return True
        except OutOfTime as exc:
            report.skip(sec, measure, f"budget ran out ({exc})")
        except Exception as exc:
            report.error(sec, measure, exc)
        finally:
            report.write()
        return False

    cpu = device.type != "cuda"
    unet_rows = sorted({2, 16, 2 * args.cap})  # 16 rows: 8 CFG samples, the target's shape
    eager_ok = optional(
        "eager", "images/s, eager", 5 if cpu else 30, lambda: section_eager(report, state, device), "b"
    )
    if eager_ok:
        optional(
            "unet",
            "UNet calls, eager",
            2 if cpu else 5,
            lambda: section_unet_calls(report, state, device, state.pipe, "eager", unet_rows),
            "c",
        )
        compiled = optional(
            "compile",
            "images/s, torch.compile",
            args.compile_min_s,
            lambda: section_compile(report, state, device, dtype),
            "b",
        )
        if compiled and "unet" not in args.skip:
            optional(
                "unet",
                "UNet call, compiled",
                2 if cpu else 20,
                lambda: section_unet_calls(report, state, device, state.compiled_pipe, "compiled", (16,)),
                "c",
            )
    else:
        report.skip("c", "UNet calls", "needs section (b) eager")
        report.skip("b", "images/s, torch.compile", "needs section (b) eager")
    state.compiled_pipe = state.pipe = None
    release()

    if args.arch == "real" and cpu:
        report.skip(
            "d", "SDXL", "real SDXL (3.5B parameters) on CPU takes minutes per image: use --arch tiny"
        )
    else:
        optional("sdxl", "SDXL", args.sdxl_min_s, lambda: section_sdxl(report, state, device, dtype), "d")

    report.add("–", "wall time", f"{budget.elapsed():.0f} s", f"budget {args.budget_s:.0f} s")
    report.write()
    print()
    print(f"## gpu_check: {label}, {args.dtype}\n")
    print(report.table(), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(started=_STARTED))
