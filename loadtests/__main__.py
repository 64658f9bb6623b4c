"""``python -m loadtests``: run a locust scenario headless against a URL, scrape the metrics, write a report.

Black box: HTTP only, nothing imported from the service. Every run is bounded: the shape stops the users
after ``--duration`` seconds (at most 900), locust gets ``--stop-timeout`` to let requests finish, and the
runner kills it if it is still there after a grace period.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

from loadtests._shared import MAX_DURATION_S, SHAPES, parse_api_keys
from loadtests.metrics import Snapshot, batch_size, normalize_metrics_url, scrape
from loadtests.report import load_entries, load_failures, load_history, write_report

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
SCENARIOS = {
    "rest": ["RestSyncUser"],
    "node": ["NodeUser"],
    "async": ["AsyncUser"],
    "openai": ["OpenAIEditsUser"],
    "mixed": ["RestSyncUser", "NodeUser", "AsyncUser", "OpenAIEditsUser"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="service base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--api-keys",
        default=os.environ.get("LOADTEST_API_KEYS", ""),
        help="comma-separated [name=]key[:weight]; users pick a tenant by weight (env LOADTEST_API_KEYS)",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="mixed")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="constant")
    parser.add_argument("--users", type=int, default=4, help="peak concurrent users (1-1000)")
    parser.add_argument("--duration", type=float, default=60, help=f"seconds of load (1-{MAX_DURATION_S})")
    parser.add_argument("--steps", default="2-4", help="denoising steps per request, MIN-MAX")
    parser.add_argument("--model", default="", help="model id (default: the service's default)")
    parser.add_argument(
        "--metrics-url", default="", help="Ray's exporter, e.g. http://127.0.0.1:8080/metrics"
    )
    parser.add_argument("--scrape-interval", type=float, default=3.0, help="seconds between metric scrapes")
    parser.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines")
    parser.add_argument(
        "--stop-timeout", type=float, default=30, help="seconds users get to finish at the end"
    )
    parser.add_argument("--max-error-rate", type=float, default=None, help="exit 3 when the rate is higher")
    parser.add_argument("--out", type=Path, default=Path("loadtest-report"), help="report folder")
    args = parser.parse_args(argv)
    if urlparse(args.url).scheme not in ("http", "https"):
        parser.error("--url must be http(s)://host[:port]")
    if not 1 <= args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be 1-{MAX_DURATION_S} s")
    if not 1 <= args.users <= 1000:
        parser.error("--users must be 1-1000")
    if not parse_api_keys(args.api_keys):
        parser.error("--api-keys (or LOADTEST_API_KEYS) is required")
    args.stop_timeout = min(max(args.stop_timeout, 0), 300)
    args.scrape_interval = min(max(args.scrape_interval, 0.5), 60)
    return args


def _reader(stream, log, latest: dict) -> None:
    """Copies locust's output to the log; remembers the newest progress line."""
    for line in stream:
        log.write(line)
        if line.startswith("LOADTEST_PROGRESS "):
            try:
                latest.update(json.loads(line.split(" ", 1)[1]))
                latest["fresh"] = True
            except ValueError:
                pass


def _progress(latest: dict, snapshots: list[Snapshot]) -> str:
    line = (
        f"[{latest.get('elapsed_s', 0):6.1f}s] users {latest.get('users', 0):3d}  "
        f"requests {latest.get('requests', 0):5d}  failures {latest.get('failures', 0):4d}  "
        f"{latest.get('rps', 0):6.2f} req/s  p50 {latest.get('p50_ms') or 0:6.0f} ms"
    )
    if len(snapshots) >= 2:
        size = batch_size(snapshots[-2], snapshots[-1])
        replicas = ", ".join(f"{d} {n}" for d, n in snapshots[-1].replicas.items())
        line += f"  batch {size:.2f}" if size else "  batch -"
        line += f"  in-flight {snapshots[-1].inflight:.0f}  replicas: {replicas}"
    return line


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):
        stale.unlink()
    prefix = raw / "locust"
    tenants = [name for name, _, _ in parse_api_keys(args.api_keys)]
    env = {
        **os.environ,
        "LOADTEST_API_KEYS": args.api_keys,
        "LOADTEST_SHAPE": args.shape,
        "LOADTEST_USERS": str(args.users),
        "LOADTEST_DURATION": str(args.duration),
        "LOADTEST_STEPS": args.steps,
        "LOADTEST_MODEL": args.model,
        "LOADTEST_PROGRESS_INTERVAL": str(args.progress_interval),
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        args.url.rstrip("/"),
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--json-file",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        str(int(args.stop_timeout)),
        "--loglevel",
        "WARNING",
        *SCENARIOS[args.scenario],
    ]
    metrics_url = normalize_metrics_url(args.metrics_url) if args.metrics_url else ""
    print(
        f"locust: {args.scenario} / {args.shape}, {args.users} users, {args.duration:.0f} s "
        f"against {args.url} "
        f"(tenants: {', '.join(tenants)}); report in {out}",
        flush=True,
    )
    snapshots: list[Snapshot] = []
    if metrics_url and (first := scrape(metrics_url)):
        snapshots.append(first)
    deadline = time.monotonic() + args.duration + args.stop_timeout + 60
    latest: dict = {}
    started = time.time()
    with (raw / "locust.log").open("w") as log:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        reader = threading.Thread(target=_reader, args=(process.stdout, log, latest), daemon=True)
        reader.start()
        next_scrape = time.monotonic() + args.scrape_interval
        max_ticks = int((deadline - time.monotonic()) / 0.5) + 2
        for _ in range(max_ticks):
            if process.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
            if metrics_url and time.monotonic() >= next_scrape:
                next_scrape = time.monotonic() + args.scrape_interval
                if snap := scrape(metrics_url, timeout_s=min(5.0, args.scrape_interval)):
                    snapshots.append(snap)
            if latest.pop("fresh", False):
                print(_progress(latest, snapshots), flush=True)
        if process.poll() is None:
            print("locust overran its time limit: stopping it", file=sys.stderr, flush=True)
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=15)
        reader.join(timeout=5)
    wall_s = time.time() - started
    if metrics_url and (snap := scrape(metrics_url)):
        snapshots.append(snap)

    (raw / "metrics.json").write_text(json.dumps([dataclasses.asdict(s) for s in snapshots], default=str))
    entries = load_entries(prefix.with_suffix(".json"))
    if not entries:
        print(f"locust produced no statistics (exit {process.returncode}); see {raw / 'locust.log'}")
        return 2
    starts = [e["start_time"] for e in entries if e["num_requests"]]
    ends = [e["last_request_timestamp"] for e in entries if e["num_requests"]]
    load_s = (max(ends) - min(starts)) if starts else wall_s
    config = {
        "url": args.url,
        "scenario": args.scenario,
        "shape": args.shape,
        "users": args.users,
        "duration": args.duration,
        "steps": args.steps,
        "tenants": tenants,
        "metrics_url": metrics_url,
        "scrape_interval": args.scrape_interval,
    }
    summary = write_report(
        out,
        config=config,
        entries=entries,
        history=load_history(Path(f"{prefix}_stats_history.csv")),
        snapshots=snapshots,
        failures=load_failures(Path(f"{prefix}_failures.csv")),
        wall_s=max(load_s, 1e-9),
    )
    requests = sum(e["num_requests"] for e in entries)
    failures = sum(e["num_failures"] for e in entries)
    print(f"done: {requests} requests, {failures} failures in {wall_s:.0f} s; report: {summary}", flush=True)
    if args.max_error_rate is not None and requests and failures / requests > args.max_error_rate:
        print(f"error rate {failures / requests:.3f} > --max-error-rate {args.max_error_rate}")
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
