"""A real ``redis-server`` (Debian's package) on a free loopback port, for the control-plane tests.

No persistence by default; ``restart`` stops and starts it on the same port (a Redis outage), and
``stop`` leaves it down until ``start``. The password is always set: production Redis has one.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

from loadtests.stack import free_ports

SETUP_HINT = "install Debian's 'redis-server' package (scripts/setup.sh does, as root)"


class RedisServer:
    def __init__(self, workdir: Path, start_timeout_s: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError(f"redis-server not found; {SETUP_HINT}")
        self.binary, self.workdir = binary, workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.port,) = free_ports(1)
        self.password = secrets.token_urlsafe(16)
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if self.process is not None and self.process.poll() is None:
            return self
        log = (self.workdir / "redis.log").open("ab")
        try:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--requirepass",
                    self.password,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer within {self.start_timeout_s} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def flush(self) -> None:
        import redis

        redis.Redis.from_url(self.url).flushall()
