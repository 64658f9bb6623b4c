"""A real multi-node Ray cluster on one machine: a head node and a separately started inference node.

    cluster/start_multinode.sh start    # head (resource head) + worker (resource inference_node)
    cluster/start_multinode.sh deploy   # the local Serve config, model replicas pinned to the worker
    cluster/start_multinode.sh status   # nodes and the node each Serve replica landed on (state API)
    cluster/start_multinode.sh stop     # ends the processes this script started, and only those

Each node is its own ``ray start --block`` process (own session, own ports, own temp dir), so nothing
touches another Ray on this machine: no ``ray stop`` (it kills every Ray process of every user), no
``/tmp/ray/ray_current_cluster`` (a plain ``ray.init()`` elsewhere would join this cluster). Everything
binds to 127.0.0.1. The deployed config is *derived* at deploy time from
``cluster/serve_config.local.yaml`` (model deployments ask for ``{"inference_node": 1}``, the HTTP port
and paths are filled in), never kept as a second copy. State (addresses, pids, the dev API key) lives
in ``--state-dir`` (default ``var/multinode``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "cluster" / "serve_config.local.yaml"
BIN = Path(sys.executable).parent
INFERENCE_RESOURCE = "inference_node"
HOST = "127.0.0.1"  # every node's IP and every listener: GCS, raylets, dashboard, metrics, Serve

# Loopback only: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps a node on 127.0.0.1 (otherwise it
# swaps 127.0.0.1 for the LAN address and listens on all interfaces), but `ray start --address` then
# refuses to add a node. This launcher lifts that one refusal in the `ray start` CLI process only.
LOOPBACK_RAY_START = (
    "import sys, types, ray._private.ray_constants as rc, ray.scripts.scripts as cli; "
    "cli.ray_constants = types.SimpleNamespace(**{**vars(rc), 'ENABLE_RAY_CLUSTER': True}); "
    "sys.argv = ['ray', 'start', *sys.argv[1:]]; cli.main()"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")


class State:
    """The cluster's addresses, pids and secrets, as JSON in the state folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "cluster.json"

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            raise SystemExit(f"no cluster recorded in {self.path}: run `start` first")
        return json.loads(self.path.read_text())

    def save(self, data: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=2))
        self.path.chmod(0o600)  # holds the dev API key


def node_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment of every Ray process (Serve replicas inherit it): secrets and offline switches."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 (see LOOPBACK_RAY_START)
            "RAY_AUTH_MODE": "token",  # this cluster's own token, not the user's ~/.ray/auth_token
            "RAY_AUTH_TOKEN": state["ray_token"],
            "IMG2IMG_DEV_API_KEY": state["api_key"],
            "IMG2IMG_URL_SIGNING_KEY": state["url_signing_key"],
        }
    )
    return env


def _ray_start(args: list[str], log: Path, env: dict[str, str]) -> int:
    """Start one node as its own ``ray start --block`` process group; returns its pid."""
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", LOOPBACK_RAY_START, "--block", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    return process.pid


def _node_ports(metrics_port: int) -> list[str]:
    """Per-node ports that would otherwise default to fixed numbers shared by every node on a host."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={metrics_port}",
        "--min-worker-port=0",  # 0: ephemeral ports, so two raylets never hand out the same one
        "--max-worker-port=0",
    ]


def _alive_nodes(state: dict[str, Any]) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{state['dashboard']}/api/v0/nodes?detail=1&limit=100",
        headers={"Authorization": f"Bearer {state['ray_token']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except (OSError, ValueError):
        return []
    return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _wait_nodes(state: dict[str, Any], count: int, log: Path, timeout_s: float) -> None:
    """Wait until ``count`` nodes are alive; fail at once with the log if a node process died."""

    def up() -> bool:
        if not _live_members(list(state["pids"].values())[-1:]):
            raise RuntimeError(f"`ray start` exited; its log ({log}) ends:\n{log.read_text()[-3000:]}")
        return len(_alive_nodes(state)) >= count

    wait_for(up, timeout_s, f"{count} node(s) alive")


def start(state_store: State, head_cpus: int, worker_cpus: int, timeout_s: float) -> dict[str, Any]:
    temp_dir = tempfile.mkdtemp(prefix="i2i-mn-", dir="/tmp")  # short: Unix socket paths live here
    logs = state_store.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    gcs_port, dashboard_port, head_metrics, worker_metrics = (free_port() for _ in range(4))
    state: dict[str, Any] = {
        "address": f"{HOST}:{gcs_port}",
        "dashboard": f"http://{HOST}:{dashboard_port}",
        "temp_dir": temp_dir,
        "api_key": os.environ.get("IMG2IMG_DEV_API_KEY") or "dev-" + secrets.token_urlsafe(18),
        "url_signing_key": os.environ.get("IMG2IMG_URL_SIGNING_KEY") or secrets.token_urlsafe(32),
        "ray_token": secrets.token_hex(32),
        "metrics": {"head": f"{HOST}:{head_metrics}", "worker": f"{HOST}:{worker_metrics}"},
        "pids": {},
    }
    state_store.save(state)
    env = node_env(state)
    common = [f"--node-ip-address={HOST}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    state["pids"]["head"] = _ray_start(
        [
            "--head",
            f"--port={gcs_port}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            "--resources=" + json.dumps({"head": 1}),
            f"--ray-client-server-port={free_port()}",
            # The dashboard serves the state API (`ray list actors`) and `serve deploy`; loopback only.
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={dashboard_port}",
            *common,
            *_node_ports(head_metrics),
        ],
        logs / "head.log",
        env,
    )
    state_store.save(state)
    _wait_nodes(state, 1, logs / "head.log", timeout_s)
    state["pids"]["worker"] = _ray_start(
        [
            f"--address={state['address']}",
            f"--num-cpus={worker_cpus}",
            "--num-gpus=0",
            "--resources=" + json.dumps({INFERENCE_RESOURCE: 1}),
            *common,
            *_node_ports(worker_metrics),
        ],
        logs / "worker.log",
        env,
    )
    state_store.save(state)
    _wait_nodes(state, 2, logs / "worker.log", timeout_s)
    return state


def derived_serve_config(http_port: int) -> dict[str, Any]:
    """``serve_config.local.yaml`` made multi-node: model replicas need the inference node's resource."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"].update({"host": HOST, "port": http_port})
    app = config["applications"][0]
    models = app["args"]["models"]
    for model in models:
        # The inference node offers one unit; every model replica (one per family) takes its share.
        model["resources"] = {INFERENCE_RESOURCE: round(1 / len(models), 4)}
        source = Path(model["spec"]["source"])
        if not source.is_absolute() and (ROOT / source).parent.is_dir():
            model["spec"]["source"] = str(ROOT / source)  # replicas may run with another cwd
    storage = app["args"]["storage"]
    if storage.get("kind") == "local":
        storage["local_root"] = str(ROOT / storage.get("local_root", "var/outputs"))
        storage["public_base_url"] = f"http://{HOST}:{http_port}"
    return config


def deploy(state_store: State, http_port: int, timeout_s: float) -> dict[str, Any]:
    state = state_store.load()
    from inference.tiny import ensure_tiny_models  # the local config's smoke model, built offline

    ensure_tiny_models(ROOT / ".cache" / "models")
    config_path = state_store.folder / "serve_config.multinode.yaml"
    config_path.write_text(
        "# Generated by cluster/multinode.py from cluster/serve_config.local.yaml: do not edit.\n"
        + yaml.safe_dump(derived_serve_config(http_port), sort_keys=False)
    )
    subprocess.run(
        [str(BIN / "serve"), "deploy", "--address", state["dashboard"], str(config_path)],
        check=True,
        env=node_env(state),
        cwd=ROOT,
        timeout=timeout_s,
    )
    state["http"] = f"http://{HOST}:{http_port}"
    state_store.save(state)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{state['http']}/readyz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(ready, timeout_s, "the application ready (/readyz 200)", interval_s=1)
    return state


def placement(state: dict[str, Any]) -> dict[str, Any]:
    """Nodes and Serve actors with the node each runs on, from Ray's state API."""
    env = node_env(state)
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})  # read at ray import
    from ray.util.state import list_actors, list_nodes

    nodes = [
        {
            "node_id": n.node_id,
            "is_head": n.is_head_node,
            "node_ip": n.node_ip,
            "resources": n.resources_total,
            "state": n.state,
        }
        for n in list_nodes(address=state["dashboard"], detail=True, raise_on_missing_output=False)
        if n.state == "ALIVE"
    ]
    actors = [
        {"class_name": a.class_name, "name": a.name, "node_id": a.node_id, "pid": a.pid}
        for a in list_actors(
            address=state["dashboard"],
            filters=[("state", "=", "ALIVE")],
            detail=True,
            raise_on_missing_output=False,
        )
        if a.class_name.startswith(("ServeReplica:", "ServeController", "ProxyActor"))
    ]
    return {"nodes": nodes, "actors": sorted(actors, key=lambda a: a["class_name"])}


def print_placement(info: dict[str, Any]) -> None:
    names = {}
    for node in info["nodes"]:
        custom = {k: v for k, v in node["resources"].items() if k in ("head", INFERENCE_RESOURCE, "CPU")}
        role = "head" if node["is_head"] else "worker"
        custom["ip"] = node["node_ip"]
        names[node["node_id"]] = f"{role}:{node['node_id'][:8]}"
        print(f"node {names[node['node_id']]:<16} {node['state']:<6} {custom}")
    for actor in info["actors"]:
        print(f"  {actor['class_name']:<40} on {names.get(actor['node_id'], actor['node_id'])}")


def stop(state_store: State, grace_s: float = 10) -> None:
    """End this cluster's processes, and only those: SIGTERM, then SIGKILL after ``grace_s``.

    Ours are the two ``ray start`` process groups and the worker processes their raylets spawned in
    groups of their own, recognised by this cluster's auth token in their environment."""
    if not state_store.path.exists():
        print("no cluster recorded: nothing to stop")
        return
    state = state_store.load()
    groups = list(state.get("pids", {}).values())
    marker = f"RAY_AUTH_TOKEN={state['ray_token']}".encode()
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):  # start_new_session: group id = `ray start` pid
                os.killpg(pgid, signum)
        if signum == signal.SIGKILL:
            for pid in _live_members(groups, marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        try:
            wait_for(lambda: not _live_members(groups, marker), wait_s, "processes to exit", interval_s=0.25)
            break
        except TimeoutError:
            continue
    for _ in range(3):  # a process that was still exiting may have recreated a folder
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
        time.sleep(0.2)
    state_store.path.unlink()
    print(f"stopped the nodes (process groups {groups})")


def _live_members(groups: list[int], marker: bytes = b"") -> list[int]:
    """Running (not zombie) processes in these process groups or with ``marker`` in their environment."""
    live = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":
                continue
            if int(fields[2]) in groups or (marker and marker in (proc / "environ").read_bytes()):
                live.append(int(proc.name))
        except OSError:
            continue
    return live


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "deploy", "status", "stop", "up"])
    parser.add_argument("--state-dir", type=Path, default=ROOT / "var" / "multinode")
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--worker-cpus", type=int, default=2)
    parser.add_argument("--http-port", type=int, default=0, help="Serve HTTP port (0: a free one)")
    parser.add_argument("--timeout-s", type=float, default=180)
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    args = parser.parse_args(argv)
    store = State(args.state_dir.resolve())

    if args.command in ("start", "up"):
        if store.path.exists():
            raise SystemExit(f"a cluster is already recorded in {store.path}: run `stop` first")
        state = start(store, args.head_cpus, args.worker_cpus, args.timeout_s)
        print(
            f"cluster up: RAY_ADDRESS={state['address']}  dashboard (state API, serve deploy): "
            f"{state['dashboard']}  metrics: {', '.join(state['metrics'].values())}"
        )
    if args.command in ("deploy", "up"):
        state = deploy(store, args.http_port or free_port(), args.timeout_s)
        print(f"application ready on {state['http']}  (API key, tenant 'dev': {state['api_key']})")
    if args.command in ("status", "up"):
        info = placement(store.load())
        if args.json:
            print(json.dumps(info))
        else:
            print_placement(info)
    if args.command == "stop":
        stop(store)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
