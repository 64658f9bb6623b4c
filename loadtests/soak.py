"""Bounded soak: steady mixed load on the four APIs, every answer checked, Ray process memory sampled.

``python -m loadtests.soak`` sends a steady open-loop stream of mixed requests for a fixed time, checks
every answer, and samples the memory of every Ray process over time.

Why: load tests find the peak; a soak finds what only time shows: memory that keeps growing, a replica
that restarts, a slow drift into errors. Passing means zero failed requests, a client that kept to its
schedule, and (reported, optionally enforced) no process whose memory still grows once warm.

By default it starts its own stack as subprocesses (``loadtests/stack.py``): the service as ``make run``
starts it (``python -m serve.local``, Ray and the app on the tiny models, on free 127.0.0.1 ports) with
real S3 storage (SeaweedFS's ``weed mini``; ``--storage local`` for the ingress-served folder), and
stops them at the end. It imports nothing from the service: HTTP only. With ``--url``/``--api-key`` it
targets a running service and samples the processes of the Ray node on this machine if it finds one.

Bounded: arrivals stop at ``--duration`` and at ``--max-requests``, at most ``--concurrency`` requests are
in flight, a request that cannot be sent within ``--max-lag`` of its due time is skipped (and the run is
"behind"), and whatever is still running ``--drain-timeout`` seconds after the last send is cut off (and
counted as an error). Exit status: 0 pass; otherwise bit flags 1 = failed requests, 2 = fell
behind the schedule, 4 = memory growth flagged (only with ``--fail-on-growth``); 8 = the service could
not be started or reached; 130 = interrupted (the partial report is still written).

    .venv/bin/python -m loadtests.soak --duration 600 --out out/soak
    .venv/bin/python -m loadtests.soak --url http://127.0.0.1:8000 --api-key KEY \\
        --metrics-url 127.0.0.1:8080 --out out/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from loadtests.growth import all_growth, steady_window
from loadtests.metrics import Snapshot, normalize_metrics_url, scrape
from loadtests.schedule import PROCESSES, arrivals, schedule_health
from loadtests.soak_client import ENDPOINTS, SIDES, STEPS, SoakClient, draw, source_images
from loadtests.soak_report import EXIT_NO_SERVICE, Outcome, build_summary, exit_code, write_report
from loadtests.stack import DEFAULT_CONFIG, DEFAULT_MODELS_DIR, LocalService, SeaweedS3, wait_until
from loadtests.workers import MemorySample, WorkerSampler, local_ray_roots

DEFAULT_RATE = 2.5  # requests/s: ~55 % of the ~4.4 req/s the local stack sustained on a shared 2-core CPU
MAX_DURATION_S = 3600
S3_BUCKET = "soak-outputs"


@dataclass
class Target:
    """What the soak talks to and whose processes it samples."""

    url: str
    api_key: str
    storage: str
    metrics_url: str = ""
    roots: list[int] = field(default_factory=list)
    driver_pid: int | None = None


@dataclass
class SoakState:
    """Everything recorded during the run; kept outside the event loop so an interrupted run still
    reports what it saw."""

    t0: float = 0.0
    scheduled: int = 0
    lags: list[float] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[MemorySample] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    in_flight: int = 0
    load_end: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0


# --- the service -----------------------------------------------------------------------------------


@contextlib.contextmanager
def local_service(args: argparse.Namespace) -> Iterator[Target]:
    """The service as a subprocess (``python -m serve.local`` on a generated config, output in
    ``--out``/service.log), with a SeaweedFS S3 server behind it unless ``--storage local``; both
    stopped on the way out. The sampler takes the service's process and everything below it (Ray's
    processes, every Serve actor), not the S3 server (a sibling, not a child, of the service)."""
    with contextlib.ExitStack() as stack:
        s3_storage, environment = None, {}
        if args.storage == "s3":
            s3 = SeaweedS3()
            stack.callback(s3.close)
            s3.start()
            environment = s3.environment()
            s3_storage = {"kind": "s3", "bucket": S3_BUCKET, "url_expiry_s": 3600}
            print(f"S3 (SeaweedFS) on {s3.endpoint}, started in {s3.startup_s:.1f} s", flush=True)
        service = LocalService(
            config=args.config,
            models_dir=args.models_dir,
            num_cpus=args.num_cpus,
            torch_threads=args.torch_threads,
            max_batch_samples=args.max_batch_samples,
            s3=s3_storage,
            environment=environment,
            start_timeout_s=args.start_timeout,
            log_path=args.out / "service.log",
        )
        stack.callback(service.stop)
        service.start()
        yield Target(
            url=service.base_url,
            api_key=service.api_key,
            storage=args.storage,
            metrics_url=normalize_metrics_url(service.metrics_url),
            roots=[service.pid],
            driver_pid=service.pid,
        )


@contextlib.contextmanager
def remote_service(args: argparse.Namespace) -> Iterator[Target]:
    roots = [args.ray_root_pid] if args.ray_root_pid else local_ray_roots()
    yield Target(
        url=args.url.rstrip("/"),
        api_key=args.api_key,
        storage="remote",
        metrics_url=normalize_metrics_url(args.metrics_url) if args.metrics_url else "",
        roots=roots,
    )


def memory_note(target: Target, interval_s: float) -> str:
    if not target.roots:
        return (
            "No Ray node found on this machine (no `raylet` process visible; pass `--ray-root-pid`): "
            "worker memory was NOT sampled."
        )
    if target.driver_pid:
        return (
            f"Every ~{interval_s:.0f} s: the service's process (`driver`: `python -m serve.local`, the Ray "
            "driver) and every process below it (Ray's own processes, each Serve actor); not the load "
            "client, nor the S3 server (test infrastructure, it grows with the objects it stores)."
        )
    return (
        f"Every ~{interval_s:.0f} s: the processes under pid(s) {', '.join(map(str, target.roots))} on "
        "this machine (the Ray node's starter, Ray's own processes, each Serve actor)."
    )


# --- the run ---------------------------------------------------------------------------------------


async def sample_loop(
    state: SoakState, sampler: WorkerSampler, metrics_url: str, interval_s: float, stop: asyncio.Event
) -> None:
    """Memory (and Prometheus, if given) now and every ``interval_s`` until ``stop``; a progress line each
    time. A final reading is taken by the caller after the drain."""
    while True:
        await take_sample(state, sampler, metrics_url)
        print(progress_line(state), flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set():
            return


async def take_sample(state: SoakState, sampler: WorkerSampler, metrics_url: str) -> None:
    t = state.now()
    state.samples += await asyncio.to_thread(sampler.sample, t)
    if metrics_url and (snapshot := await asyncio.to_thread(scrape, metrics_url)):
        state.snapshots.append(snapshot)


def progress_line(state: SoakState) -> str:
    errors = sum(o.error is not None for o in state.outcomes)
    latest = max((s.t for s in state.samples), default=None)
    biggest = sorted((s for s in state.samples if s.t == latest), key=lambda s: -s.rss_mb)[:3]
    memory = ", ".join(f"{s.label} {s.rss_mb:.0f}" for s in biggest) or "-"
    return (
        f"[{state.now():5.0f}s] sent {len(state.lags)}/{state.scheduled}  done {len(state.outcomes)}  "
        f"errors {errors}  in flight {state.in_flight}  lag {state.lags[-1] if state.lags else 0:.1f}s  "
        f"RSS MB: {memory}"
    )


async def acquire_within(slots: asyncio.Semaphore, timeout_s: float) -> bool:
    """Take a concurrency slot, waiting at most ``timeout_s`` (none at all when one is free)."""
    if not slots.locked():
        await slots.acquire()
        return True
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, timeout_s))
    except TimeoutError:
        return False
    return True


async def dispatch(
    state: SoakState, client: SoakClient, schedule: list[float], args: argparse.Namespace
) -> None:
    """Send each request when due (open loop) once a concurrency slot is free, or skip it when none is
    free within ``--max-lag``; so sending ends by ``--duration`` + ``--max-lag``. Requests in flight then
    get ``--drain-timeout`` seconds before they are cut off."""
    slots = asyncio.Semaphore(args.concurrency)
    rng = random.Random(args.seed)
    endpoints = tuple(args.endpoints)
    tasks: set[asyncio.Task] = set()

    async def one(d, due: float, sent: float) -> None:
        state.in_flight += 1
        started = time.monotonic()
        try:
            try:
                error, downloaded = await client.run(d)
            except Exception as bug:  # a client bug must show up as an error, not vanish
                error, downloaded = f"client:{type(bug).__name__}", False
            state.outcomes.append(
                Outcome(d.endpoint, due, sent, time.monotonic() - started, error, downloaded)
            )
        except asyncio.CancelledError:
            state.outcomes.append(Outcome(d.endpoint, due, sent, None, "unfinished:cut_off_after_drain"))
            raise
        finally:
            state.in_flight -= 1
            slots.release()

    try:
        for due in schedule:
            d = draw(rng, endpoints)
            await asyncio.sleep(max(0.0, due - state.now()))
            if not await acquire_within(slots, due + args.max_lag - state.now()):
                continue  # no slot within --max-lag of its due time: left unsent, the run is "behind"
            sent = state.now()
            state.lags.append(sent - due)
            task = asyncio.create_task(one(d, due, sent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        state.load_end = state.now()
        if tasks:
            await asyncio.wait(set(tasks), timeout=args.drain_timeout)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class WarmUpFailed(RuntimeError):
    """A warm-up request failed: the service is up but broken, so the soak does not start."""


async def warm_up(client: SoakClient, args: argparse.Namespace) -> None:
    """One uncounted request per endpoint, in turn: first-call costs (torch, storage, connections) and a
    broken setup show up here, before the clock starts."""
    rng = random.Random(f"warm-up-{args.seed}")
    for endpoint in args.endpoints:
        d = draw(rng, (endpoint,))
        error, _ = await client.run(d)
        if error:
            raise WarmUpFailed(f"warm-up {endpoint} request failed: {error}")


async def soak(state: SoakState, target: Target, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {target.api_key}"}
    limits = httpx.Limits(max_connections=args.concurrency + 2, max_keepalive_connections=args.concurrency)
    async with (
        httpx.AsyncClient(
            base_url=target.url, headers=headers, timeout=args.request_timeout, limits=limits
        ) as api,
        httpx.AsyncClient(timeout=30) as downloads,
    ):
        client = SoakClient(
            api,
            downloads,
            {side: source_images(side, count=3, seed=side) for side in SIDES},
            model=args.model,
            job_timeout_s=args.request_timeout,
            download_fraction=args.download_fraction,
            seed=args.seed,
        )
        await warm_up(client, args)
        schedule = arrivals(args.rate, args.duration, args.max_requests, args.arrivals, args.seed)
        state.scheduled = len(schedule)
        sampler = WorkerSampler(target.roots, target.driver_pid)
        stop = asyncio.Event()
        print(
            f"soak: {len(schedule)} requests due over {args.duration:.0f} s "
            f"({args.arrivals}, {args.rate} req/s), at most {args.concurrency} in flight, "
            f"against {target.url}",
            flush=True,
        )
        state.t0 = time.monotonic()
        sampling = asyncio.create_task(
            sample_loop(state, sampler, target.metrics_url, args.sample_interval, stop)
        )
        try:
            await dispatch(state, client, schedule, args)
        finally:
            stop.set()
            await sampling
            await take_sample(state, sampler, target.metrics_url)


def report(state: SoakState, target: Target, args: argparse.Namespace) -> int:
    end_t = max((s.t for s in state.samples), default=state.now())
    window = steady_window(0.0, end_t, args.warmup_fraction)
    growth = all_growth(
        state.samples,
        0.0,
        end_t,
        threshold_mb_per_h=args.growth_threshold,
        warmup_fraction=args.warmup_fraction,
        min_rise_mb=args.min_rise,
    )
    health = schedule_health(state.scheduled, state.lags, args.max_lag)
    errors = sum(o.error is not None for o in state.outcomes)
    status = exit_code(errors, health, growth, args.fail_on_growth)
    config = {
        "target": target.url,
        "storage": target.storage,
        "arrivals": args.arrivals,
        "rate": args.rate,
        "duration": args.duration,
        "max_requests": args.max_requests,
        "concurrency": args.concurrency,
        "endpoints": list(args.endpoints),
        "steps": f"{STEPS[0]}-{STEPS[1]}",
        "sides": "/".join(map(str, SIDES)),
        "seed": args.seed,
        "request_timeout": args.request_timeout,
        "drain_timeout": args.drain_timeout,
        "warmup_fraction": args.warmup_fraction,
        "window_start_s": window[0],
        "growth_threshold_mb_h": args.growth_threshold,
        "min_rise_mb": args.min_rise,
        "metrics_url": target.metrics_url,
        "scrape_interval": args.sample_interval,
    }
    load_s = state.load_end if state.load_end is not None else state.now()
    summary = build_summary(
        config=config,
        outcomes=state.outcomes,
        load_s=load_s,
        wall_s=state.now() if state.t0 else 0.0,
        health=health,
        growth=growth,
        memory_note=memory_note(target, args.sample_interval),
        snapshots=state.snapshots,
        exit_status=status,
    )
    path, markdown = write_report(args.out, summary, state.samples, state.snapshots)
    print("\n" + markdown, flush=True)
    print(f"report: {path} (and soak.json, memory.png beside it); exit {status}", flush=True)
    return status


# --- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=600, help=f"seconds of arrivals (1-{MAX_DURATION_S})"
    )
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="mean arrivals per second")
    parser.add_argument("--arrivals", choices=PROCESSES, default="poisson", help="arrival process")
    parser.add_argument(
        "--max-requests", type=int, help="hard cap on requests (default: 1.5 × rate × duration + 10)"
    )
    parser.add_argument("--concurrency", type=int, default=8, help="most requests in flight at once")
    parser.add_argument(
        "--endpoints", default=",".join(ENDPOINTS), help=f"comma-separated subset of {','.join(ENDPOINTS)}"
    )
    parser.add_argument("--model", help="model id sent with every request (default: the service's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds arrivals and parameters")
    parser.add_argument("--request-timeout", type=float, default=120, help="per HTTP call and per async job")
    parser.add_argument(
        "--drain-timeout", type=float, default=120, help="seconds in-flight requests get at the end"
    )
    parser.add_argument(
        "--download-fraction", type=float, default=0.2, help="share of answers whose image is fetched"
    )
    parser.add_argument("--sample-interval", type=float, default=10, help="seconds between memory samples")
    parser.add_argument(
        "--warmup-fraction", type=float, default=0.5, help="share of the run left out of slopes"
    )
    parser.add_argument("--growth-threshold", type=float, default=50, help="flag a slope above this, MB/h")
    parser.add_argument(
        "--min-rise", type=float, default=2, help="... with a fitted rise of at least this, MB"
    )
    parser.add_argument(
        "--fail-on-growth", action="store_true", help="exit with bit 4 when a process is flagged"
    )
    parser.add_argument(
        "--max-lag",
        type=float,
        default=10,
        help="skip a request not sent this long after it was due (the run is then 'behind'), s",
    )
    parser.add_argument("--out", type=Path, default=Path("out/soak"), help="report folder")
    local = parser.add_argument_group("own stack (default): python -m serve.local as a subprocess")
    local.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="Serve config to start from (ports etc. replaced)"
    )
    local.add_argument(
        "--models-dir", type=Path, default=DEFAULT_MODELS_DIR, help="tiny models (built there if missing)"
    )
    local.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs given to Ray")
    local.add_argument(
        "--torch-threads",
        type=int,
        help="override the config's torch_threads per model replica (on a busy 2-core box, 2 threads "
        "can make each step >10x slower than 1)",
    )
    local.add_argument(
        "--storage", choices=("s3", "local"), default="s3", help="SeaweedFS S3, or a local folder"
    )
    local.add_argument("--max-batch-samples", type=int, default=8, help="the engine's batch cap")
    local.add_argument(
        "--start-timeout", type=float, default=300, help="seconds the service gets to answer /readyz"
    )
    remote = parser.add_argument_group("existing service")
    remote.add_argument("--url", help="base URL of a running service, e.g. http://127.0.0.1:8000")
    remote.add_argument("--api-key", default=os.environ.get("IMG2IMG_DEV_API_KEY"))
    remote.add_argument("--metrics-url", default="", help="its Ray exporter, HOST:PORT or a full URL")
    remote.add_argument(
        "--ray-root-pid", type=int, help="sample this process and its children (default: found)"
    )
    args = parser.parse_args(argv)
    args.endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    if not args.endpoints or set(args.endpoints) - set(ENDPOINTS):
        parser.error(f"--endpoints must be a subset of {','.join(ENDPOINTS)}")
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be 1-{MAX_DURATION_S} s")
    if args.rate <= 0 or args.concurrency < 1 or args.sample_interval <= 0:
        parser.error("--rate, --concurrency and --sample-interval must be positive")
    if not 0 <= args.warmup_fraction < 1:
        parser.error("--warmup-fraction must be in [0, 1)")
    if not 1 <= args.start_timeout <= 1800:
        parser.error("--start-timeout must be 1-1800 s")
    if not 0 <= args.download_fraction <= 1:
        parser.error("--download-fraction must be in [0, 1]")
    if args.max_lag <= 0:
        parser.error("--max-lag must be positive")
    if args.max_requests is None:
        args.max_requests = int(1.5 * args.rate * args.duration) + 10
    if args.max_requests < 1:
        parser.error("--max-requests must be positive")
    args.drain_timeout = min(max(args.drain_timeout, 0), 600)
    if args.url:
        if urlparse(args.url).scheme not in ("http", "https"):
            parser.error("--url must be http(s)://host[:port]")
        if not args.api_key:
            parser.error("--url needs --api-key (or IMG2IMG_DEV_API_KEY)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM → KeyboardInterrupt → cleanup
    service = remote_service if args.url else local_service
    state = SoakState()
    try:
        with contextlib.ExitStack() as resources:
            try:
                target = resources.enter_context(service(args))
                wait_until(
                    lambda: httpx.get(f"{target.url}/readyz", timeout=10).status_code == 200,
                    30,
                    "/readyz 200",
                )
            except Exception as error:  # any start-up failure: say so, clean up, exit 8
                traceback.print_exc()
                print(f"soak could not start the service or reach it: {error}", file=sys.stderr, flush=True)
                return EXIT_NO_SERVICE
            if not target.roots:
                print(memory_note(target, args.sample_interval), flush=True)
            try:
                asyncio.run(soak(state, target, args))
            except WarmUpFailed as error:
                print(f"soak stopped before the clock started: {error}", file=sys.stderr, flush=True)
                return EXIT_NO_SERVICE
            except KeyboardInterrupt:
                if state.t0:  # the clock had started: report what was seen
                    print("interrupted: writing the partial report", file=sys.stderr, flush=True)
                    report(state, target, args)
                return 130
            return report(state, target, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
