"""Tenancy on the real stack: limits shared by two ingress replicas, isolation, usage metering."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve.tenancy.keys import hash_key
from tests.integration.conftest import LIMITED_KEY, wait_until_ready
from tests.integration.test_serve_stack import _data_url, _png, _wait_for

URL = "/v1/image-to-image"


@pytest.fixture(scope="module")
def client(stack):
    wait_until_ready(stack)
    with httpx.Client(base_url=stack.base_url, timeout=120) as http:  # no key: each test brings its own
        yield http


def _body(**overrides):
    return {"image": _data_url(_png()), "prompt": "a lantern", "steps": 4, **overrides}


def test_two_ingress_replicas_serve_the_app(stack):
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Ingress#" in a["name"]]
    assert len(replicas) == 2


def test_rate_limit_holds_across_ingress_replicas(client):
    """4 images/minute in total, whichever replica a request lands on: 8 one-image requests → 4 pass."""
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post(URL, json=_body(), headers=headers), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 4 + [429] * 4, [r.text[:300] for r in responses if r.status_code != 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["retry-after"]) >= 1


def test_plan_and_isolation(client, stack):
    limited = {"Authorization": f"Bearer {LIMITED_KEY}"}
    too_many = client.post(URL, json=_body(num_images=3), headers=limited)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "num_images"
    mine = client.post(URL, json=_body(), headers=stack.headers)
    assert mine.status_code == 200
    job_id = mine.json()["id"]
    assert "/tenant-a/" in mine.json()["images"][0]["url"]  # objects live under the tenant's prefix
    assert client.get(f"{URL}/{job_id}", headers=stack.headers).status_code == 200
    assert client.get(f"{URL}/{job_id}", headers=limited).status_code == 404  # another tenant's id


def test_usage_is_metered_and_exported_per_tenant(client, stack):
    before = client.get("/v1/usage", headers=stack.headers).json()
    assert client.post(URL, json=_body(num_images=2), headers=stack.headers).status_code == 200
    after = client.get("/v1/usage", headers=stack.headers).json()
    assert after["requests"] == before["requests"] + 1
    assert after["images"] == before["images"] + 2
    assert after["steps"] > before["steps"] and after["compute_seconds"] > before["compute_seconds"]

    def exported():
        text = httpx.get(f"http://{stack.metrics_url}/metrics", timeout=10).text
        return [line for line in text.splitlines() if line.startswith("ray_img2img_tenant_images_total{")]

    lines = _wait_for(exported, 60, 1, "per-tenant metrics")
    assert any('tenant="tenant-a"' in line for line in lines)


def test_admin_cli_keys_take_effect_on_the_running_stack(client, stack, tmp_path, capsys, monkeypatch):
    """img2img-admin writes tenants to the same S3 store; ingress replicas pick them up within seconds."""
    import yaml

    from serve import admin

    config = tmp_path / "serve_config.yaml"
    args = {"models": [{"spec": {"id": "tiny-sd", "family": "sd", "source": "unused"}}]}
    args["storage"] = {"kind": "s3", "bucket": stack.bucket}
    config.write_text(yaml.safe_dump({"applications": [{"args": args}]}))

    def cli(*argv) -> str:
        assert admin.main(["--config", str(config), *argv]) == 0
        return capsys.readouterr().out.strip()

    cli("create-tenant", "cli-tenant", "--rate", "600")
    key = cli("issue-key", "cli-tenant").splitlines()[0]
    headers = {"Authorization": f"Bearer {key}"}

    def everywhere(expected: int):  # several calls in a row, so both ingress replicas answer
        return lambda: all(
            client.get("/v1/models", headers=headers).status_code == expected for _ in range(6)
        )

    _wait_for(everywhere(200), 60, 1, "the new key accepted by every ingress replica")
    assert client.post(URL, json=_body(), headers=headers).status_code == 200
    cli("revoke-key", "cli-tenant", "--hash", hash_key(key)[:12])
    _wait_for(everywhere(401), 60, 1, "the revoked key refused by every ingress replica")
