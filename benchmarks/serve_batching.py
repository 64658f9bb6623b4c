"""Step-level batching through the whole service: cap 1 vs cap 8, over real HTTP.

What it measures: N concurrent closed-loop clients (``--concurrency``, default 16) post mixed
requests to ``POST /v1/image-to-image`` (base64 PNG source, strength ∈ {0.3, 0.5, 0.75, 1.0},
steps ∈ {10, 20, 30}, guidance ∈ {3, 5, 7.5, 9}, random seed and prompt, one image each) for
``--duration`` seconds per phase. The phases differ only in the engine's ``max_batch_samples``:

- cap 1: every UNet call carries one sample, i.e. no batching across requests (each replica
  serves its queue one denoising step of one image at a time, interleaved);
- cap 8: the engine lets up to 8 samples with different prompts, seeds, strength, steps and
  guidance share every UNet call, joining between steps and leaving as soon as they finish.

For each phase it prints throughput (images/s, requests/s), client-side p50/p95 latency, the HTTP
error count (must be 0), and the real batch size, mean samples per UNet call, from the deltas of
Ray's Prometheus exporter series ``ray_img2img_batch_samples_sum`` / ``_count``. Caveat: Ray's
exporter rebuilds a histogram's ``_sum`` from bucket MIDPOINTS (``ray/_private/telemetry/
open_telemetry_metric_recorder.py``), so with buckets 1, 2, 3, 4, 6, 8... a 1-sample step counts
0.5 and a 3-sample step 2.5: ``_sum/_count`` is biased low (exactly 0.5 at cap 1). ``_count`` (UNet
calls) is exact, so the script also prints the exact figure: the sample-steps the phase's requests
needed (``max(1, int(steps * strength))`` each, diffusers' img2img truncation, one sample per image)
divided by the ``_count`` delta, and the range the ``_bucket`` deltas allow. It then prints the
cap8/cap1 ratios of throughput and p95 latency.

Why: this is the end-to-end check that the step-level engine's gain survives the serving layer
(ingress, Serve routing, storage, JSON/base64), not only the engine alone
(``benchmarks/engine_batching.py``).

By default it starts its own stack: a single-node Ray on loopback (its own metrics export port),
Serve on a free HTTP port, the application of ``cluster/serve_config.local.yaml`` with the tiny
random-weight model from ``--models-dir`` (built offline if missing) and local storage in a
temporary folder. Caps are switched by re-running ``serve.run`` with a new ``engine`` block and
waiting until the application is RUNNING and ready again; every phase is preceded by a short,
uncounted warm-up. The script reports whether the model replica survived the switch (Ray
named-actor ids before/after). With Ray 2.60 it does not: a Python ``serve.run`` gives every
deployment a new random code version (and the ingress's init args carry the engine block), so Serve
replaces the replicas instead of calling ``ModelWorker.reconfigure``; a live reconfigure needs a
config deploy that changes only the deployment's ``user_config``.
With ``--url``/``--api-key`` it targets an existing service instead: it cannot change the cap then,
so it measures one phase at whatever cap is deployed (batch metrics only with ``--metrics-url``).

The numbers are for the tiny model on CPU (a few cores shared with the clients, Ray and the ingress):
absolute figures are NOT GPU figures and the machine may be shared; compare the ratios.

    .venv/bin/python benchmarks/serve_batching.py [--concurrency 16] [--duration 45] [--json out.json]
    .venv/bin/python benchmarks/serve_batching.py --torch-threads 1   # busy 2-core box: see --help
    .venv/bin/python benchmarks/serve_batching.py --url http://127.0.0.1:8000 --api-key KEY \\
        [--metrics-url 127.0.0.1:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import random
import re
import secrets
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The black-box load tests' helpers (loadtests never imports us; we may import it).
from loadtests._shared import percentile  # noqa: E402
from loadtests.soak_client import source_images  # noqa: E402
from loadtests.stack import free_ports, wait_until  # noqa: E402

APP_NAME = "img2img"
STRENGTHS = (0.3, 0.5, 0.75, 1.0)
STEPS = (10, 20, 30)
GUIDANCES = (3.0, 5.0, 7.5, 9.0)
SUBJECTS = ("a cat on a sofa", "a lighthouse at dusk", "an oil painting of a harbour", "city at night")
MODIFIERS = ("watercolour", "photograph", "in the rain", "pencil sketch", "neon", "snowy morning")
BATCH_METRIC = "ray_img2img_batch_samples"
_SERIES = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+\d+)?$")


@dataclass
class PhaseResult:
    label: str
    cap: int | None
    duration_s: float
    ok: int = 0
    images: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    unet_calls: float | None = None
    sample_steps: int = 0  # denoising steps the successful requests needed, summed over images
    unet_samples: float | None = None  # exporter _sum delta (bucket-midpoint approximation)
    bucket_bounds: tuple[float, float] | None = None  # sample-step range the _bucket deltas allow

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def samples_per_step(self) -> float | None:
        """Exact: sample-steps the requests needed / UNet calls the replica made (errors must be 0)."""
        if not self.unet_calls:
            return None
        return self.sample_steps / self.unet_calls

    @property
    def exporter_samples_per_step(self) -> float | None:
        """``_sum/_count`` as Prometheus sees it: biased low by Ray's midpoint reconstruction."""
        if not self.unet_calls or self.unet_samples is None:
            return None
        return self.unet_samples / self.unet_calls

    @property
    def unet_calls_per_s(self) -> float | None:
        return self.unet_calls / self.elapsed_s if self.unet_calls and self.elapsed_s else None

    def latency(self, q: float) -> float | None:
        return percentile(self.latencies_s, q)

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("latencies_s")
        data.update(
            error_count=self.error_count,
            requests_per_s=self.requests_per_s,
            images_per_s=self.images_per_s,
            p50_s=self.latency(50),
            p95_s=self.latency(95),
            max_s=max(self.latencies_s, default=None),
            samples_per_unet_step=self.samples_per_step,
            exporter_samples_per_unet_step=self.exporter_samples_per_step,
            bucket_samples_per_unet_step=(
                [bound / self.unet_calls for bound in self.bucket_bounds]
                if self.bucket_bounds and self.unet_calls
                else None
            ),
            unet_calls_per_s=self.unet_calls_per_s,
        )
        return data


def denoise_steps(body: dict[str, Any]) -> int:
    """UNet steps one image of ``body`` needs: diffusers' img2img ``int(steps * strength)``, at least 1."""
    return max(1, min(int(body["steps"] * body["strength"]), body["steps"]))


def request_body(rng: random.Random, sources: list[str], model: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "image": rng.choice(sources),
        "prompt": f"{rng.choice(SUBJECTS)}, {rng.choice(MODIFIERS)} #{rng.randrange(10**6)}",
        "strength": rng.choice(STRENGTHS),
        "steps": rng.choice(STEPS),
        "guidance_scale": rng.choice(GUIDANCES),
        "seed": rng.randrange(2**32),
        "num_images": 1,
    }
    if model:
        body["model"] = model
    return body


# --- metrics ---------------------------------------------------------------------------------------


def scrape(metrics_url: str | None) -> dict[str, float]:
    """Every ``ray_img2img_batch_samples`` ``_sum``/``_count``/``_bucket`` series, by full series name."""
    if not metrics_url:
        return {}
    text = httpx.get(f"http://{metrics_url}/metrics", timeout=10).text
    series = {}
    for line in text.splitlines():
        if line.startswith(BATCH_METRIC):
            match = _SERIES.match(line)
            if match:
                series[match.group(1)] = float(match.group(2))
    return series


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """Sum of per-series increases: series of a replica that went away are ignored, new ones start at 0."""
    return sum(value - before.get(key, 0.0) for key, value in after.items() if key.startswith(name + "{"))


def bucket_bounds(before: dict[str, float], after: dict[str, float]) -> tuple[float, float] | None:
    """Sample-step range from the ``_bucket`` deltas: integer observations in (a, b] lie in a+1..b."""
    cumulative: dict[float, float] = {}
    for key, value in after.items():
        match = re.match(rf'^{BATCH_METRIC}_bucket\{{.*\ble="([^"]+)"', key)
        if match:
            le = float(match.group(1))
            cumulative[le] = cumulative.get(le, 0.0) + value - before.get(key, 0.0)
    if not cumulative:
        return None
    low = high = 0.0
    previous_le, previous_count = 0.0, 0.0
    for le in sorted(cumulative):
        count = cumulative[le] - previous_count
        if count > 0:
            low += count * (int(previous_le) + 1)
            high += count * le  # inf if anything landed in the +Inf bucket
        previous_le, previous_count = le, cumulative[le]
    return low, high


def settled_metrics(metrics_url: str | None, previous: dict[str, float] | None = None) -> dict[str, float]:
    """Scrape until the batch counters stop moving (Ray exports every ~1 s), at least 2.5 s, at most 20 s."""
    if not metrics_url:
        return {}
    time.sleep(2.5)
    last = scrape(metrics_url)
    deadline = time.monotonic() + 17.5
    while time.monotonic() < deadline:
        time.sleep(1.5)
        current = scrape(metrics_url)
        counts_stable = metric_delta(last, current, BATCH_METRIC + "_count") == 0
        moved = previous is None or metric_delta(previous, current, BATCH_METRIC + "_count") > 0
        if counts_stable and moved:
            return current
        last = current
    return last


# --- load ------------------------------------------------------------------------------------------


async def client_loop(
    index: int,
    http: httpx.AsyncClient,
    result: PhaseResult,
    sources: list[str],
    args: argparse.Namespace,
    deadline: float,
    budget: list[int],
) -> float:
    """One closed-loop client: send, wait for the answer, send the next, until deadline or budget."""
    rng = random.Random(f"{args.seed}-{index}")  # same request stream in every phase
    last_done = time.monotonic()
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        body = request_body(rng, sources, args.model)
        start = time.monotonic()
        try:
            response = await http.post("/v1/image-to-image", json=body)
        except httpx.HTTPError as error:
            key = type(error).__name__
        else:
            key = None if response.status_code == 200 else str(response.status_code)
            if key is None:
                images = response.json().get("images", [])
                if len(images) != body["num_images"]:
                    key = "wrong_image_count"
        last_done = time.monotonic()
        if key is None:
            result.ok += 1
            result.images += body["num_images"]
            result.sample_steps += body["num_images"] * denoise_steps(body)
            result.latencies_s.append(last_done - start)
        else:
            result.errors[key] = result.errors.get(key, 0) + 1
    return last_done


async def run_load(
    base_url: str, headers: dict[str, str], result: PhaseResult, sources: list[str], args: argparse.Namespace
) -> None:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.request_timeout, limits=limits
    ) as http:
        start = time.monotonic()
        deadline = start + result.duration_s
        budget = [args.max_requests]
        ends = await asyncio.gather(
            *(client_loop(i, http, result, sources, args, deadline, budget) for i in range(args.concurrency))
        )
        result.elapsed_s = max(ends) - start


def warm_up(base_url: str, headers: dict[str, str], sources: list[str], args: argparse.Namespace) -> None:
    """A few concurrent requests, not counted: first-call costs (torch, storage, connections)."""
    if args.warmup <= 0:
        return
    result = PhaseResult("warm-up", None, duration_s=300)
    warm_args = copy.copy(args)
    warm_args.concurrency, warm_args.max_requests, warm_args.seed = args.warmup, args.warmup, -1
    asyncio.run(run_load(base_url, headers, result, sources, warm_args))
    if result.error_count:
        raise RuntimeError(f"warm-up failed: {result.errors}")


def measure(
    label: str,
    cap: int | None,
    base_url: str,
    headers: dict[str, str],
    sources: list[str],
    metrics_url: str | None,
    args: argparse.Namespace,
) -> PhaseResult:
    warm_up(base_url, headers, sources, args)
    before = settled_metrics(metrics_url)
    result = PhaseResult(label, cap, duration_s=args.duration)
    print(f"[{label}] {args.concurrency} clients for {args.duration:.0f} s ...", flush=True)
    asyncio.run(run_load(base_url, headers, result, sources, args))
    if metrics_url:
        after = settled_metrics(metrics_url, before)
        result.unet_calls = metric_delta(before, after, BATCH_METRIC + "_count")
        result.unet_samples = metric_delta(before, after, BATCH_METRIC + "_sum")
        result.bucket_bounds = bucket_bounds(before, after)
    print(
        f"[{label}] {result.ok} ok, {result.error_count} errors in {result.elapsed_s:.1f} s",
        flush=True,
    )
    return result


# --- the stack -------------------------------------------------------------------------------------


class LocalStack:
    """Ray + Serve + the app on loopback, with the engine cap switchable by re-running ``serve.run``."""

    def __init__(self, args: argparse.Namespace, storage: dict[str, Any] | None = None) -> None:
        """``args`` carries ``add_local_stack_arguments``'s options; ``storage`` replaces the config's
        storage block (e.g. ``{"kind": "s3", "bucket": ...}``, secrets in the environment before
        ``start``); without it outputs go to local storage in a temporary folder."""
        self.args = args
        self.storage = storage
        self.http_port, self.metrics_port = free_ports(2)
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.metrics_url = f"127.0.0.1:{self.metrics_port}"
        self.api_key = ""
        self.model_deployment = ""
        self._outputs: tempfile.TemporaryDirectory | None = None
        self._app_args: dict[str, Any] = {}
        self._ray_started = False

    def start(self) -> None:
        import yaml

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        # Ray's flag is case-sensitive; set before ray.init so every worker exports each second.
        os.environ.update({"RAY_metrics_report_interval_ms": "1000"})
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.api_key = os.environ.setdefault("IMG2IMG_DEV_API_KEY", "bench-" + secrets.token_urlsafe(18))
        os.environ.setdefault("IMG2IMG_URL_SIGNING_KEY", secrets.token_urlsafe(32))

        from inference.models import Family
        from inference.tiny import TINY_MODEL_IDS, ensure_tiny_models

        models_dir = self.args.models_dir.resolve()
        folders = ensure_tiny_models(models_dir)

        config = yaml.safe_load(self.args.config.read_text())
        app_args = copy.deepcopy(config["applications"][0]["args"])
        model = app_args["models"][0]
        if Path(model["spec"]["source"]).name == TINY_MODEL_IDS[Family.SD]:
            model["spec"]["source"] = str(folders[Family.SD])
        if self.args.torch_threads:
            for entry in app_args["models"]:
                entry["torch_threads"] = self.args.torch_threads
        if self.storage is None:
            self._outputs = tempfile.TemporaryDirectory(prefix="serve-batching-outputs-")
            app_args["storage"].update(
                kind="local", local_root=self._outputs.name, public_base_url=self.base_url, url_expiry_s=600
            )
        else:
            app_args["storage"].update(self.storage)
        self._app_args = app_args
        self.model_deployment = f"model-{model['spec']['id']}"

        import ray
        from ray import serve

        print(
            f"starting Ray ({self.args.num_cpus} CPUs), Serve on {self.base_url}, metrics {self.metrics_url}",
            flush=True,
        )
        ray.init(
            address="local",  # never attach to someone else's cluster
            num_cpus=self.args.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            _metrics_export_port=self.metrics_port,
            log_to_driver=False,
        )
        self._ray_started = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.http_port})

    def deploy(self, cap: int) -> dict[str, Any]:
        """(Re)deploy with ``max_batch_samples = cap``; report whether the model replica was replaced."""
        from ray import serve

        from serve.app import build_app

        app_args = copy.deepcopy(self._app_args)
        for model in app_args["models"]:
            model["engine"] = {**model.get("engine", {}), "max_batch_samples": cap}
        before = self.replica_ids()
        started = time.monotonic()
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/")
        wait_until(
            lambda: serve.status().applications[APP_NAME].status == "RUNNING", 300, "application RUNNING"
        )
        wait_until(
            lambda: httpx.get(f"{self.base_url}/readyz", timeout=10).status_code == 200, 300, "/readyz 200"
        )
        after = self.replica_ids()
        switch = {
            "cap": cap,
            "seconds": round(time.monotonic() - started, 1),
            "replicas_before": before,
            "replicas_after": after,
            "replica_restarted": bool(before) and before != after,
        }
        return switch

    def replica_ids(self) -> list[str]:
        """Live model-replica actor names (``SERVE_REPLICA::app#deployment#id``): a new id = a new replica."""
        import ray

        names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
        return sorted(n for n in names if n.startswith("SERVE_REPLICA::") and self.model_deployment in n)

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._ray_started = False
        if self._outputs is not None:
            self._outputs.cleanup()
            self._outputs = None


# --- report ----------------------------------------------------------------------------------------


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report(phases: list[PhaseResult], args: argparse.Namespace) -> dict[str, Any]:
    print(
        f"\n### serve_batching: {args.concurrency} clients, {args.duration:.0f} s/phase, "
        f"{args.size}x{args.size} source, tiny model on CPU\n"
    )
    print(
        "| cap | requests | images | HTTP errors | time s | req/s | img/s | p50 s | p95 s "
        "| samples/UNet step | exporter _sum/_count | UNet calls | UNet calls/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in phases:
        print(
            f"| {p.label} | {p.ok} | {p.images} | {p.error_count} | {p.elapsed_s:.1f} "
            f"| {p.requests_per_s:.2f} | {p.images_per_s:.2f} | {_fmt(p.latency(50), '.2f')} "
            f"| {_fmt(p.latency(95), '.2f')} | {_fmt(p.samples_per_step, '.2f')} "
            f"| {_fmt(p.exporter_samples_per_step, '.2f')} | {_fmt(p.unet_calls, '.0f')} "
            f"| {_fmt(p.unet_calls_per_s, '.1f')} |"
        )
    print(
        "\nsamples/UNet step = sample-steps the requests needed / UNet calls (the _count delta); the "
        "exporter's _sum is rebuilt from bucket midpoints by Ray (a 1-sample step counts 0.5), so "
        "_sum/_count is biased low."
    )
    for p in phases:
        if p.bucket_bounds and p.unet_calls:
            low, high = (bound / p.unet_calls for bound in p.bucket_bounds)
            print(
                f"  {p.label}: {p.sample_steps} sample-steps over {p.unet_calls:.0f} calls; "
                f"_bucket deltas allow {low:.2f}..{high:.2f} samples/call"
            )
    ratios = {}
    if len(phases) >= 2:
        base = phases[0]
        print()
        print(f"| ratio vs {base.label} | img/s | req/s | p50 | p95 | samples/UNet step |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in phases[1:]:
            r = {
                "images_per_s": ratio(p.images_per_s, base.images_per_s),
                "requests_per_s": ratio(p.requests_per_s, base.requests_per_s),
                "p50": ratio(p.latency(50), base.latency(50)),
                "p95": ratio(p.latency(95), base.latency(95)),
                "samples_per_unet_step": ratio(p.samples_per_step, base.samples_per_step),
            }
            ratios[f"{p.label}/{base.label}"] = r
            print(
                f"| {p.label} / {base.label} | {_fmt(r['images_per_s'], '.2f')}x "
                f"| {_fmt(r['requests_per_s'], '.2f')}x | {_fmt(r['p50'], '.2f')}x "
                f"| {_fmt(r['p95'], '.2f')}x | {_fmt(r['samples_per_unet_step'], '.2f')}x |"
            )
    errors = {p.label: p.errors for p in phases if p.errors}
    print(f"\nHTTP errors per phase: {', '.join(f'{p.label}: {p.error_count}' for p in phases)}")
    if errors:
        print(f"  by kind: {errors}")
    return ratios


def add_local_stack_arguments(group: argparse._ActionsContainer) -> None:
    """The options ``LocalStack`` reads."""
    group.add_argument("--models-dir", type=Path, default=Path(".cache/models"))
    group.add_argument("--config", type=Path, default=REPO_ROOT / "cluster/serve_config.local.yaml")
    group.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    group.add_argument(
        "--torch-threads",
        type=int,
        help="override the config's torch_threads per model replica (on a busy 2-core box, 2 threads "
        "can make each step >10x slower than 1)",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent closed-loop clients")
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of load per phase")
    parser.add_argument("--max-requests", type=int, default=5000, help="request budget per phase")
    parser.add_argument("--caps", type=int, nargs="+", default=[1, 8], help="max_batch_samples per phase")
    parser.add_argument("--size", type=int, default=64, help="source image side in pixels")
    parser.add_argument("--warmup", type=int, default=4, help="uncounted requests before each phase")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request streams")
    parser.add_argument("--request-timeout", type=float, default=330.0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    add_local_stack_arguments(parser.add_argument_group("own stack (default)"))
    remote = parser.add_argument_group("existing service (one phase, cap as deployed)")
    remote.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    remote.add_argument("--api-key", default=os.environ.get("IMG2IMG_DEV_API_KEY"))
    remote.add_argument("--metrics-url", help="host:port of its Ray metrics exporter (for samples/step)")
    remote.add_argument("--model", help="model id (default: the service's first)")
    args = parser.parse_args(argv)
    if args.url and not args.api_key:
        parser.error("--url needs --api-key (or IMG2IMG_DEV_API_KEY)")
    if args.concurrency < 1 or args.duration <= 0 or args.max_requests < 1:
        parser.error("--concurrency, --duration and --max-requests must be positive")
    if not 8 <= args.size <= 2048:
        parser.error("--size must be in 8..2048")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sources = source_images(args.size, count=4)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM → KeyboardInterrupt → cleanup
    phases: list[PhaseResult] = []
    switches: list[dict[str, Any]] = []
    stack: LocalStack | None = None
    started = time.monotonic()
    try:
        if args.url:
            print(
                f"targeting {args.url}: the engine cap cannot be changed from here, measuring ONE phase "
                f"at the deployed cap{'' if args.metrics_url else ' (no --metrics-url: no batch sizes)'}",
                flush=True,
            )
            headers = {"Authorization": f"Bearer {args.api_key}"}
            wait_until(lambda: httpx.get(f"{args.url}/readyz", timeout=10).status_code == 200, 60, "/readyz")
            phases.append(measure("deployed", None, args.url, headers, sources, args.metrics_url, args))
        else:
            stack = LocalStack(args)
            stack.start()
            headers = {"Authorization": f"Bearer {stack.api_key}"}
            for cap in args.caps:
                switch = stack.deploy(cap)
                switches.append(switch)
                restarted = switch["replica_restarted"]
                note = (
                    "first deployment"
                    if not switch["replicas_before"]
                    else ("model replica RESTARTED" if restarted else "same model replica (live reconfigure)")
                )
                print(
                    f"cap {cap}: deployed in {switch['seconds']} s, {note}: {switch['replicas_after']}",
                    flush=True,
                )
                phases.append(
                    measure(f"cap {cap}", cap, stack.base_url, headers, sources, stack.metrics_url, args)
                )
        ratios = report(phases, args)
        total = time.monotonic() - started
        print(f"total wall time {total:.0f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            payload = {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "phases": [p.summary() for p in phases],
                "ratios": ratios,
                "cap_switches": switches,
                "total_wall_s": total,
            }
            if args.api_key:
                payload["config"]["api_key"] = "***"
            args.json.write_text(json.dumps(payload, indent=2))
            print(f"wrote {args.json}")
        return 0 if all(p.error_count == 0 for p in phases) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    raise SystemExit(main())
