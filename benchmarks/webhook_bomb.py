"""Memory of a process delivering webhooks to receivers that answer with gzip bombs: before and after.

Security round 2, finding 2: three webhook receivers answering with a 0.5 MB gzip of zeros took the
job coordinator from 165 MB to 2.1 GB RSS, because delivery read the whole answer and let httpx
gunzip it. This script measures both delivery paths side by side, each in a fresh process (so neither
inherits the other's heap), against the same three receivers on 127.0.0.1:

* ``old``: what ``serve.jobs.webhooks.deliver`` did before: the pinned httpx client, ``client.post`` (reads
  the whole body; httpx asks for gzip and decodes it);
* ``new``: ``serve.jobs.webhooks.deliver`` as shipped (asks for ``identity``, streams, never reads the body).

Each receiver answers every POST with ``Content-Encoding: gzip`` and ~0.5 MB of gzip that inflates
to 512 MiB (``--inflated-mib``). Printed per path: RSS after imports (baseline), peak RSS (VmHWM),
RSS afterwards, and the wall time of the three concurrent deliveries. Loopback only; bounded: the old
path needs about 3 x the inflated size of memory at its peak, so keep ``--inflated-mib`` modest on
small machines.

    PYTHONPATH=. .venv/bin/python benchmarks/webhook_bomb.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECEIVERS = 3


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _receivers(bomb: bytes) -> tuple[list[str], list[ThreadingHTTPServer]]:
    class Bomb(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")  # whatever Accept-Encoding asked for
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def handle(self):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the new path hangs up
                super().handle()

        def log_message(self, *args):
            pass

    servers, urls = [], []
    for _ in range(RECEIVERS):
        server = ThreadingHTTPServer(("127.0.0.1", 0), Bomb)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        urls.append(f"http://127.0.0.1:{server.server_address[1]}/hook")
    return urls, servers


async def _deliver_old(urls: list[str], payload: dict) -> list[int]:
    """The delivery path before round 2, verbatim in what matters: ``client.post`` on the pinned client."""
    from serve.outbound.fetch import FetchPolicy, pinned_client

    policy = FetchPolicy(allow_networks=("127.0.0.1/32",))
    body = json.dumps(payload).encode()

    async def one(url: str) -> int:
        async with pinned_client(policy, "webhook_url") as client:
            response = await client.post(url, content=body, headers={"Content-Type": "application/json"})
            return response.status_code

    return list(await asyncio.gather(*(one(url) for url in urls)))


async def _deliver_new(urls: list[str], payload: dict) -> list[int]:
    from serve.jobs.webhooks import WebhookPolicy, deliver
    from serve.outbound.fetch import FetchPolicy

    fetch_policy = FetchPolicy(allow_networks=("127.0.0.1/32",))
    policy = WebhookPolicy(max_attempts=1, timeout_s=30)
    statuses: list[int] = []

    async def record(attempt) -> None:
        statuses.append(attempt.status_code)

    secret = b"benchmark-webhook-secret"
    await asyncio.gather(
        *(
            deliver(url, payload, secret, fetch_policy, policy, record, event_id=f"job-{i}")
            for i, url in enumerate(urls)
        )
    )
    return statuses


def child(mode: str, urls: list[str]) -> None:
    import serve.jobs.webhooks  # noqa: F401 - the baseline includes what a coordinator has loaded

    payload = {"id": "job", "status": "completed", "images": [{"url": "https://example.invalid/a.png"}]}
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    statuses = asyncio.run((_deliver_old if mode == "old" else _deliver_new)(urls, payload))
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "mode": mode,
                "statuses": statuses,
                "baseline_mb": round(baseline, 1),
                "peak_mb": round(_status_mb("VmHWM"), 1),
                "after_mb": round(_status_mb("VmRSS"), 1),
                "seconds": round(seconds, 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inflated-mib", type=int, default=512, help="what each gzip answer inflates to")
    parser.add_argument("--child", choices=("old", "new"), help=argparse.SUPPRESS)
    parser.add_argument("--urls", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.urls)

    sys.path.insert(0, str(ROOT))
    from tests.support.hostile_http import gzip_bomb

    bomb = gzip_bomb(args.inflated_mib << 20)
    urls, servers = _receivers(bomb)
    size = f"{len(bomb) / 1e6:.2f} MB of gzip -> {args.inflated_mib} MiB"
    print(f"{RECEIVERS} receivers on loopback, each answering {size}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print(f"{'path':<5} {'statuses':<16} {'baseline MB':>12} {'peak MB':>9} {'after MB':>9} {'seconds':>8}")
    try:
        for mode in ("old", "new"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--urls", *urls],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"{mode:<5} {','.join(map(str, r['statuses'])):<16} {r['baseline_mb']:>12} {r['peak_mb']:>9} "
                f"{r['after_mb']:>9} {r['seconds']:>8}"
            )
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()
