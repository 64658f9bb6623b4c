"""Stable Diffusion 1.5 (random weights) on one device: plain diffusers vs the service's engine.

The model is the real SD1.5 architecture built from ``benchmarks/sd15_configs/`` (UNet 860M, VAE 84M,
CLIP ViT-L text encoder 123M) with random weights (``torch.manual_seed``): throughput and FLOPs depend
on the architecture only. Prompts are tokenised with the byte-level stand-in vocabulary of
``inference/tiny.py`` (the real CLIP vocabulary cannot be downloaded here); every prompt is still
padded to 77 tokens, so the work is the same as with the real tokenizer. The images are noise.

Measured in one run, on the same requests (all arriving at t=0, each with its own prompt and seed):

- (1) ``plain``: the stock ``StableDiffusionImg2ImgPipeline``, one request at a time (batch 1, CFG),
  no optimisation beyond diffusers' defaults;
- (2) ``engine``: ``StepBatchingEngine`` (cap ``--cap``, default 8) over the same pipeline after
  ``inference.optimize.optimize_pipeline``: channels_last UNet/VAE, SDPA attention (verified), and
  with ``--compile`` a ``torch.compile(unet, dynamic=False)``.

Both are warmed up before timing. With ``--compile`` (and by default on CUDA) the warm-up is an
untimed run of the identical workload: arrivals are all at t=0 and the engine's batch composition is
deterministic, so it hits exactly the (rows, latent size) buckets the timed run hits, and each one is
compiled before timing starts (the script counts Dynamo graphs during the timed run to prove it: no
padding to fixed buckets is needed).

Reported per method: images/s, the ratio engine/plain, latency p50/p95 (completion time since t=0),
UNet time (CUDA events around every UNet call, no extra synchronisation) and the UNet's achieved
FLOP/s = FLOPs per sample-step x sample-steps / UNet time. FLOPs per sample-step come from
``torch.utils.flop_counter.FlopCounterMode`` on one UNet forward at batch 2 (CFG) at the run's latent
size, attention through the math SDPA backend so its matmuls are counted on every device (softmax and
element-wise ops are not counted, as is usual). The share of peak uses ``--peak-tflops`` or a
default by device name (dense fp16/bf16: H100/H200 SXM 989, H100 PCIe 756, A100 312).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_sd15.py                 # CUDA: 512 px, 20 steps, 16 req
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_sd15.py --compile --mixed
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_sd15.py --device cpu    # 128 px, 10 steps, 4 requests
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from inference.engine import EngineConfig, StepBatchingEngine
from inference.models import Family
from inference.optimize import attention_processors, optimize_pipeline
from inference.tiny import build_tokenizer
from inference.types import GenerationRequest

CONFIG_DIR = Path(__file__).resolve().parent / "sd15_configs"
PROMPTS = (
    "a cat on a sofa",
    "the dog in the park",
    "an oil painting of a harbour at dawn",
    "city at night, rain, neon reflections",
    "a bowl of fruit on a wooden table",
    "portrait of an old sailor, dramatic light",
    "snowy mountains above a lake",
    "a red bicycle leaning on a brick wall",
)
NEGATIVE_PROMPTS = (None, "blurry", "low quality", "text, watermark")
MIXED = ((0.5, 0.6, 0.8, 1.0), (10, 20, 30))  # --mixed: strengths x steps
#: Dense fp16/bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
DEFAULTS = {  # device type -> (size, steps, requests)
    "cuda": (512, 20, 16),
    "cpu": (128, 10, 4),
}


# ---- the model -------------------------------------------------------------------------------------


def _config(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text(encoding="utf-8"))


def clip_text_config(config: dict, tokenizer) -> CLIPTextConfig:
    """A published CLIP text-encoder config whose special token ids follow the stand-in tokenizer."""
    text_config = CLIPTextConfig.from_dict(config)
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    text_config.pad_token_id = tokenizer.pad_token_id
    return text_config


def build_sd15(device: torch.device, dtype: torch.dtype, seed: int) -> StableDiffusionImg2ImgPipeline:
    """SD1.5's architecture with random weights (same seed, same weights), on ``device`` in ``dtype``."""
    tokenizer = build_tokenizer()  # stand-in byte-level vocabulary, model_max_length 77
    text_config = clip_text_config(_config("text_encoder.json"), tokenizer)
    with torch.device(device):  # initialise in place: a GPU draws 1B random weights in a blink
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(_config("vae.json"))
        torch.manual_seed(seed + 2)
        unet = UNet2DConditionModel.from_config(_config("unet.json"))
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(_config("scheduler.json")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []"
    pipe.to(device=device, dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            component.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_flops_per_sample_step(pipe, latent: int) -> int:
    """FLOPs of one UNet forward at batch 2 (one CFG sample) on a ``latent`` x ``latent`` grid."""
    unet, device, dtype = pipe.unet, pipe.device, pipe.unet.dtype
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=device, dtype=dtype)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    timestep = torch.tensor([500, 500], device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        unet(sample, timestep, encoder_hidden_states=hidden, return_dict=False)
    return counter.get_total_flops()


# ---- timing the UNet -------------------------------------------------------------------------------


class UNetTimer:
    """Sums the time of every call of ``module`` (CUDA events: no synchronisation inside the run).

    Hooks go on the module the pipeline calls (``pipe.unet``, the ``OptimizedModule`` when compiled),
    so they run outside the compiled graph.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._pairs: list = []
        self._cpu_s = 0.0
        self._start = None
        self._handles = [
            module.register_forward_pre_hook(self._before),
            module.register_forward_hook(self._after),
        ]

    def _now(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _before(self, *_):
        self._start = self._now()

    def _after(self, *_):
        end = self._now()
        if self._cuda:
            self._pairs.append((self._start, end))
        else:
            self._cpu_s += end - self._start

    def seconds(self) -> float:
        """Total UNet seconds so far (synchronises once on CUDA)."""
        if self._cuda:
            torch.cuda.synchronize()
            return self._cpu_s + sum(a.elapsed_time(b) for a, b in self._pairs) / 1000
        return self._cpu_s

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- workload --------------------------------------------------------------------------------------


def make_requests(args) -> list[GenerationRequest]:
    rng = random.Random(args.seed)
    source = np.random.default_rng(args.seed).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    image = Image.fromarray(source)
    requests = []
    for i in range(args.requests):
        strength, steps = args.strength, args.steps
        if args.mixed:
            strength, steps = rng.choice(MIXED[0]), rng.choice(MIXED[1])
        requests.append(
            GenerationRequest(
                request_id=f"r{i}",
                model="sd15-random",
                prompt=f"{PROMPTS[i % len(PROMPTS)]}, variation {i}",
                negative_prompt=NEGATIVE_PROMPTS[i % len(NEGATIVE_PROMPTS)],
                image=image,
                seed=args.seed * 10_000 + i,
                strength=strength,
                steps=steps,
                guidance_scale=args.guidance,
                image_guidance_scale=1.5,
            )
        )
    return requests


def sample_steps(requests: list[GenerationRequest]) -> int:
    """UNet sample-steps the workload runs (diffusers' ``int(steps * strength)``, at least 1)."""
    return sum(max(int(r.steps * r.strength), 1) for r in requests)


@dataclass
class Run:
    wall_s: float = 0.0
    unet_s: float = 0.0
    finished: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)  # samples per UNet call
    buckets: set[tuple[int, ...]] = field(default_factory=set)  # (rows, height, width) per UNet call


def run_plain(pipe, requests: list[GenerationRequest], device: torch.device) -> Run:
    """(1) The stock pipeline, one request at a time, in arrival order."""
    run, timer = Run(), UNetTimer(pipe.unet, device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for r in requests:
            out = pipe(
                prompt=r.prompt,
                negative_prompt=r.negative_prompt,
                image=r.image,
                strength=r.strength,
                num_inference_steps=r.steps,
                guidance_scale=r.guidance_scale,
                generator=torch.Generator("cpu").manual_seed(r.seed),
                output_type="np",
            )
            sync(device)  # the numpy output has synchronised already; explicit for the timestamp
            run.finished[r.request_id] = time.perf_counter() - start
            run.images[r.request_id] = out.images[0]
            run.batches.append(1)
    run.wall_s = time.perf_counter() - start
    run.unet_s = timer.seconds()
    timer.remove()
    return run


def run_engine(engine: StepBatchingEngine, pipe, requests, device: torch.device) -> Run:
    """(2) Everything submitted at t=0, then ``step()`` until idle."""
    run, timer = Run(), UNetTimer(pipe.unet, device)
    sync(device)
    start = time.perf_counter()
    for r in requests:
        engine.submit(r)
    while engine.has_work:
        outcomes, stats = engine.step()
        for outcome in outcomes:
            if outcome.result is None:
                raise RuntimeError(f"engine failed {outcome.request_id}: {outcome.error}")
            run.finished[outcome.request_id] = time.perf_counter() - start  # images are numpy: synced
            run.images[outcome.request_id] = outcome.result.images[0]
        if stats is not None:
            run.batches.append(stats.samples)
            run.buckets.add((stats.rows, *stats.bucket))
    sync(device)
    run.wall_s = time.perf_counter() - start
    run.unet_s = timer.seconds()
    timer.remove()
    return run


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# ---- reporting -------------------------------------------------------------------------------------


def default_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def figures(run: Run, requests, flops_per_step: int, peak_tflops: float | None) -> dict:
    latencies = [run.finished[r.request_id] for r in requests]
    flops = flops_per_step * sample_steps(requests)
    achieved = flops / run.unet_s if run.unet_s else float("nan")
    return {
        "images_per_s": len(requests) / run.wall_s,
        "wall_s": run.wall_s,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": float(np.percentile(latencies, 95)),
        "unet_s": run.unet_s,
        "unet_share_of_wall": run.unet_s / run.wall_s,
        "mean_batch": statistics.fmean(run.batches),
        "unet_tflops_per_s": achieved / 1e12,
        "share_of_peak": achieved / (peak_tflops * 1e12) if peak_tflops else None,
    }


def max_abs_diff(a: Run, b: Run) -> float:
    return float(np.max([np.abs(a.images[k].astype(np.float64) - b.images[k]).max() for k in a.images]))


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (cuda)"
    return f"cpu ({torch.get_num_threads()} threads)"


def print_table(results: dict[str, dict], label: str) -> None:
    print(
        "| method | device | img/s | p50 s | p95 s | UNet s | UNet share | mean batch "
        "| UNet TFLOP/s | % peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, f in results.items():
        peak = "n/a" if f["share_of_peak"] is None else f"{100 * f['share_of_peak']:.1f}%"
        tflops = f["unet_tflops_per_s"]
        speed = f"{tflops:.1f}" if tflops >= 1 else f"{tflops:.4f} ({1000 * tflops:.1f} GFLOP/s)"
        print(
            f"| {name} | {label} | {f['images_per_s']:.3f} | {f['latency_p50_s']:.2f} | "
            f"{f['latency_p95_s']:.2f} | {f['unet_s']:.2f} | {100 * f['unet_share_of_wall']:.0f}% | "
            f"{f['mean_batch']:.2f} | {speed} | {peak} |"
        )


# ---- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"), help="fp16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--size", type=int, help="image side in px (CUDA 512, CPU 128)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (CUDA 20, CPU 10)")
    parser.add_argument("--requests", type=int, help="requests, all at t=0 (CUDA 16, CPU 4)")
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--mixed", action="store_true", help=f"vary strength x steps over {MIXED}")
    parser.add_argument("--cap", type=int, default=8, help="engine max_batch_samples")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (dynamic=False)")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-sdpa", action="store_true", help="do not force AttnProcessor2_0")
    parser.add_argument("--ablate", action="store_true", help="also run the engine before optimising")
    parser.add_argument(
        "--warmup",
        choices=("full", "short"),
        help="full: an untimed identical run per method (default on CUDA and with --compile); "
        "short: one 1-step request per method",
    )
    parser.add_argument("--peak-tflops", type=float, help="device peak for the UNet dtype, TFLOP/s")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    size, steps, count = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    args.size = args.size or size
    args.steps = args.steps or steps
    args.requests = args.requests or count
    args.dtype = args.dtype or ("float16" if device.type == "cuda" else "float32")
    args.warmup = args.warmup or ("full" if device.type == "cuda" or args.compile else "short")
    if args.size % 8:
        parser.error("--size must be a multiple of 8")
    return args


def warmup_requests(requests: list[GenerationRequest], mode: str) -> list[GenerationRequest]:
    if mode == "full":
        return [dataclasses.replace(r, request_id="warm-" + r.request_id) for r in requests]
    return [dataclasses.replace(requests[0], request_id="warm", steps=1, strength=1.0)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    label = device_label(device)
    requests = make_requests(args)
    started = time.perf_counter()
    pipe = build_sd15(device, dtype, args.seed)
    params = {
        n: sum(p.numel() for p in getattr(pipe, n).parameters()) for n in ("unet", "vae", "text_encoder")
    }
    flops = unet_flops_per_sample_step(pipe, args.size // 8)
    peak = args.peak_tflops or default_peak(device, dtype)
    steps = sample_steps(requests)
    print(f"# SD1.5 architecture, random weights: plain diffusers vs StepBatchingEngine on {label}\n")
    print(
        f"torch {torch.__version__}, {args.dtype}, {args.size}x{args.size}, {args.requests} requests at t=0, "
    )
    workload = "mixed strength/steps" if args.mixed else f"strength {args.strength}, {args.steps} steps"
    print(
        f"{workload}, guidance {args.guidance} (CFG), {steps} UNet sample-steps in all, engine cap {args.cap}"
    )
    print("params: " + ", ".join(f"{n} {v / 1e6:.1f}M" for n, v in params.items()), end="")
    print(f"; built in {time.perf_counter() - started:.1f} s")
    print(
        f"UNet FLOPs per sample-step (batch 2, latent {args.size // 8}x{args.size // 8}): "
        f"{flops / 1e9:.1f} GFLOP"
    )
    print(f"peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    print(f"plain attention processors: {attention_processors(pipe)}; warm-up: {args.warmup}\n", flush=True)

    runs: dict[str, Run] = {}
    run_plain(pipe, warmup_requests(requests, args.warmup), device)
    runs["(1) plain diffusers, batch 1"] = plain = run_plain(pipe, requests, device)
    engine = StepBatchingEngine(pipe, Family.SD, EngineConfig(max_batch_samples=args.cap), output_type="np")
    if args.ablate:
        run_engine(engine, pipe, warmup_requests(requests, args.warmup), device)
        runs["(2a) engine, no optimisation"] = run_engine(engine, pipe, requests, device)

    report = optimize_pipeline(
        pipe,
        channels_last=not args.no_channels_last,
        sdpa=not args.no_sdpa,
        compile=args.compile,
        compile_mode=args.compile_mode,
    )
    print(f"optimisations: {report}", flush=True)
    warm_started = time.perf_counter()
    warm = run_engine(engine, pipe, warmup_requests(requests, args.warmup), device)
    print(
        f"engine warm-up: {time.perf_counter() - warm_started:.1f} s, "
        f"buckets (rows, h, w) {sorted(warm.buckets)}"
    )
    graphs_before = dynamo_graphs()
    runs["(2) engine + optimisations"] = optimised = run_engine(engine, pipe, requests, device)
    recompiled = dynamo_graphs() - graphs_before
    print(f"timed buckets (rows, h, w): {sorted(optimised.buckets)}")
    if args.compile:
        print(f"Dynamo graphs compiled during the timed run: {recompiled} (0 = every bucket was warm)")
    print()

    results = {name: figures(run, requests, flops, peak) for name, run in runs.items()}
    print_table(results, label)
    ratio = (
        results["(2) engine + optimisations"]["images_per_s"]
        / results["(1) plain diffusers, batch 1"]["images_per_s"]
    )
    print(f"\nengine/plain images/s = **{ratio:.2f}x** on {label}")
    diff = max_abs_diff(plain, optimised)
    print(
        f"max |engine - plain| over all output pixels in [0, 1]: {diff:.2e}"
        + (" (NaN in the outputs: random fp16 weights overflow)" if np.isnan(diff) else "")
    )
    if args.json:
        out = {
            "config": {k: str(v) for k, v in vars(args).items()},
            "device": label,
            "ratio": ratio,
            "flops_per_sample_step": flops,
            "peak_tflops": peak,
            "results": results,
            "optimisations": {k: str(v) for k, v in report.items()},
        }
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
