"""A real two-node Ray cluster (cluster/start_multinode.sh): model replicas land on the inference node.

Everything runs in subprocesses with the cluster's own ports, temp dir and auth token, so the
session's in-process Ray (the ``stack`` fixture) is never touched: no ``ray.init`` here, no
``ray stop``, and no ``/tmp/ray/ray_current_cluster`` written.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

SCRIPT = Path("cluster/start_multinode.sh")
BUDGET_S = 240


def _env() -> dict[str, str]:
    """This process' environment without other clusters' addresses and the stack fixture's secrets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "IMG2IMG_"))}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "IMG2IMG_DEV_API_KEY": "multinode-test-key-0123456789"})
    return env


def _script(state_dir: Path, *args: str, deadline: float) -> str:
    remaining = max(5.0, deadline - time.monotonic())
    result = subprocess.run(
        ["bash", str(SCRIPT), *args, "--state-dir", str(state_dir), "--timeout-s", str(int(remaining))],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=remaining + 10,
    )
    if result.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in sorted(state_dir.glob("logs/*.log")))
        pytest.fail(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}{logs}")
    return result.stdout


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 90)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.timeout(BUDGET_S + 60)
def test_model_replicas_run_on_the_inference_node_and_answer(tmp_path):
    state_dir = tmp_path / "multinode"
    deadline = time.monotonic() + BUDGET_S
    try:
        _script(state_dir, "start", deadline=deadline)
        _script(state_dir, "deploy", deadline=deadline)
        placement = json.loads(_script(state_dir, "status", "--json", deadline=deadline).splitlines()[-1])

        nodes = {node["node_id"]: node for node in placement["nodes"]}
        inference = [n for n, node in nodes.items() if node["resources"].get("inference_node")]
        assert len(nodes) == 2 and len(inference) == 1, nodes
        assert not nodes[inference[0]]["is_head"]
        models = [a for a in placement["actors"] if a["class_name"].startswith("ServeReplica:img2img:model-")]
        assert models, placement["actors"]
        assert {a["node_id"] for a in models} == set(inference), placement["actors"]
        controller = next(a for a in placement["actors"] if a["class_name"] == "ServeController")
        assert nodes[controller["node_id"]]["is_head"]

        state = json.loads((state_dir / "cluster.json").read_text())
        response = httpx.post(
            f"{state['http']}/v1/image-to-image",
            headers={"Authorization": f"Bearer {state['api_key']}"},
            json={"image": _png(), "prompt": "a green field", "steps": 4, "seed": 3},
            timeout=max(5.0, deadline - time.monotonic()),
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "completed" and body["model"] == "tiny-sd"
        image = httpx.get(body["images"][0]["url"], timeout=30)
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).size == (64, 64)
    finally:
        subprocess.run(
            ["bash", str(SCRIPT), "stop", "--state-dir", str(state_dir)], env=_env(), timeout=60, check=False
        )
