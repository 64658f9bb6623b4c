"""A real Prometheus server for tests: Debian's ``prometheus`` binary on loopback, scraping fast.

Started with a generated config that scrapes the given targets every second, a throwaway TSDB
folder and a free port; ``query`` runs PromQL through the HTTP API.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

SETUP_HINT = "install Debian's prometheus package (scripts/setup.sh does: apt-get install prometheus)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    def __init__(
        self, targets: list[str], scrape_interval_s: float = 1.0, start_timeout_s: float = 30.0
    ) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError(f"prometheus binary not found; {SETUP_HINT}")
        self.binary = binary
        self.targets = targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        self._interval = scrape_interval_s
        self._timeout = start_timeout_s
        self._process: subprocess.Popen | None = None

    def start(self) -> PrometheusServer:
        config = self._dir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": f"{int(self._interval * 1000)}ms",
                        "evaluation_interval": f"{int(self._interval * 1000)}ms",
                    },
                    "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": self.targets}]}],
                }
            )
        )
        log = (self._dir / "prometheus.log").open("w")
        self._process = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(
            f"prometheus did not become ready: {(self._dir / 'prometheus.log').read_text()[-2000:]}"
        )

    def query(self, promql: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"query {promql!r} failed: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)
