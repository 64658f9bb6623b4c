"""Security round 2, tenancy findings (issue 13: 3, 9, 10, 11, 13), pinned through the HTTP layer where
they are reachable over HTTP: per-tenant webhook secrets and a tenant-naming signed payload; one tenant
name rule enforced at creation; the admin CLI's exact revocations and conditional writes; a malformed
stored tenant record skipped, never fatal; ``/files`` serving only images; weak API keys refused."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import pytest
import yaml
from pydantic import ValidationError

from serve import admin
from serve.config import AppArgs, Secrets, WebhookArgs, check_api_key, key_strength_bits
from serve.jobs.webhooks import derive_webhook_secret, sign, standard_secret, webhook_secret_for
from serve.outbound.fetch import FetchPolicy
from serve.storage.objects import ConcurrentWriteError, LocalObjectStore, object_key
from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Tenant, TenantCatalog, TenantDirectory, TenantStore, check_tenant_name
from tests.unit.api_fakes import (
    API_KEY,
    AUTH,
    TENANT,
    URL_SIGNING_KEY,
    WEBHOOK_SECRET,
    WebhookReceiver,
    assert_error,
    data_url,
    receiver_verifies,
)

URL = "/v1/image-to-image"
ASYNC = {"Prefer": "respond-async"}
MODEL = {"spec": {"id": "m", "family": "sd", "source": "org/m"}}
KEY_B = "sk-tenant-b-key-7Hq2xLp9Zr4Ww"
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


def body(**overrides):
    return {"image": data_url(64, 48), "prompt": "a harbour", "steps": 4, **overrides}


def _deliver_one(client, app, headers) -> tuple[dict, bytes, dict]:
    """Submit one async job with a loopback webhook; returns (job, raw body, delivered headers)."""
    app.state.service.fetch_policy = FetchPolicy(allow_networks=("127.0.0.1/32",))
    receiver = WebhookReceiver()
    try:
        response = client.post(URL, json=body(webhook_url=receiver.url), headers={**headers, **ASYNC})
        assert response.status_code == 202, response.text
        client.portal.call(app.state.jobs.drain)
    finally:
        receiver.close()
    assert len(receiver.received) == 1, client.get(f"{URL}/{response.json()['id']}", headers=headers).json()
    sent, raw = receiver.received[0]
    return response.json(), raw, sent


@pytest.fixture
def tenant_b(app, client):
    """A second tenant, from the store, with no webhook secret of its own (like an environment tenant)."""
    client.portal.call(
        TenantStore(app.state.service.store).save, Tenant(name="tenant-b", key_hashes=[hash_key(KEY_B)])
    )
    client.portal.call(app.state.tenants.refresh)


# ---------------------------------------------------------------- finding 3: per-tenant webhook secrets


def test_tenant_a_delivery_does_not_verify_with_tenant_b_secret(client, app, tenant_b):
    """Both tenants lack a stored secret, so each signs with one derived from the server key."""
    job, raw, sent = _deliver_one(client, app, AUTH)
    secret_a = derive_webhook_secret(WEBHOOK_SECRET, TENANT)
    secret_b = derive_webhook_secret(WEBHOOK_SECRET, "tenant-b")
    assert secret_a != secret_b
    assert receiver_verifies(secret_a, raw, sent, tenant=TENANT)
    assert not receiver_verifies(secret_b, raw, sent)  # B's receiver rejects A's delivery
    assert not receiver_verifies(WEBHOOK_SECRET, raw, sent)  # the server key is not a shared secret
    payload = json.loads(raw)
    assert payload["tenant"] == TENANT and payload["id"] == job["id"]  # the tenant is in the signed body
    assert sent["webhook-id"] == job["id"]  # Standard Webhooks' message id: the same on every retry
    assert not receiver_verifies(secret_a, raw, sent, tenant="tenant-b")
    # ...and B's own delivery verifies only with B's secret
    _, raw_b, sent_b = _deliver_one(client, app, AUTH_B)
    assert receiver_verifies(secret_b, raw_b, sent_b, tenant="tenant-b")
    assert not receiver_verifies(secret_a, raw_b, sent_b)


def test_a_stored_tenant_secret_signs_its_deliveries(client, app):
    stored = "whsec_tenant-a-own-secret-0123456789"
    tenant = Tenant(name=TENANT, key_hashes=[hash_key(API_KEY)], webhook_secret=stored)
    client.portal.call(TenantStore(app.state.service.store).save, tenant)
    client.portal.call(app.state.tenants.refresh)
    app.state.jobs.tenant_lookup = app.state.tenants.lookup  # as the coordinator wires it
    _, raw, sent = _deliver_one(client, app, AUTH)
    assert receiver_verifies(standard_secret(stored.encode()), raw, sent, tenant=TENANT)
    assert not receiver_verifies(derive_webhook_secret(WEBHOOK_SECRET, TENANT), raw, sent)


def test_a_shared_secret_signs_only_when_the_operator_opts_in(client, app):
    assert WebhookArgs().shared_secret is False  # off unless the Serve config says so
    assert webhook_secret_for("a", None, WEBHOOK_SECRET) != webhook_secret_for("b", None, WEBHOOK_SECRET)
    assert webhook_secret_for("a", None, WEBHOOK_SECRET, shared=True) == WEBHOOK_SECRET
    assert webhook_secret_for("a", "whsec_own-secret-1234567", WEBHOOK_SECRET, shared=True) == (
        b"whsec_own-secret-1234567"
    )
    app.state.jobs.webhook_shared_secret = True
    _, raw, sent = _deliver_one(client, app, AUTH)
    assert receiver_verifies(WEBHOOK_SECRET, raw, sent, tenant=TENANT)


def test_without_any_secret_nothing_is_sent_and_the_job_says_why(client, app):
    app.state.jobs.webhook_secret = None
    app.state.service.fetch_policy = FetchPolicy(allow_networks=("127.0.0.1/32",))
    receiver = WebhookReceiver()
    try:
        job = client.post(URL, json=body(webhook_url=receiver.url), headers={**AUTH, **ASYNC}).json()
        client.portal.call(app.state.jobs.drain)
    finally:
        receiver.close()
    assert receiver.received == []
    final = client.get(f"{URL}/{job['id']}", headers=AUTH).json()
    assert final["status"] == "completed" and final["webhook"]["status"] == "failed"
    assert final["webhook"]["attempts"] and "webhook secret" in json.dumps(final["webhook"]["attempts"])


def test_a_receiver_rejects_a_body_naming_another_tenant_or_none():
    now = int(time.time())
    for raw in (b'{"tenant":"b"}', b"[]"):
        headers = {
            "webhook-id": "m",
            "webhook-timestamp": str(now),
            "webhook-signature": sign(b"k" * 16, "m", now, raw),
        }
        assert receiver_verifies(b"k" * 16, raw, headers) and not receiver_verifies(
            b"k" * 16, raw, headers, tenant="a"
        )


# ---------------------------------------------------------------- finding 9: one tenant-name rule


BAD_NAMES = ["acme..corp", "..", ".acme", "-acme", "a/b", "a b", "", "x" * 65, "acme\n"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_tenant_names_the_object_keys_refuse_are_refused_at_creation(name):
    with pytest.raises(ValueError):
        check_tenant_name(name)
    with pytest.raises(ValidationError):  # Serve config
        AppArgs.model_validate({"models": [MODEL], "tenants": [{"name": name}]})
    with pytest.raises(ValidationError):  # IMG2IMG_API_KEYS
        Secrets(api_keys={"sk-strong-key-Zq8Lm2Xv7Pw4": name})


@pytest.mark.parametrize("name", ["acme", "acme.corp", "a", "tenant_b-2", "A" * 64, "acme."])
def test_every_valid_tenant_name_makes_valid_object_keys(name):
    assert check_tenant_name(name) == name
    assert object_key(name, "img_x", 0, "png").startswith(f"{name}/")
    assert TenantStore.key(name) == f"_tenants/{name}.json"


def test_acme_dot_dot_corp_is_refused_by_env_config_and_the_admin_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("IMG2IMG_API_KEYS", json.dumps({"sk-strong-key-Zq8Lm2Xv7Pw4": "acme..corp"}))
    with pytest.raises(ValidationError, match="tenant name must be"):
        Secrets()
    monkeypatch.delenv("IMG2IMG_API_KEYS")
    config = _cli_config(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as refused:
        admin.main(["--config", str(config), "create-tenant", "acme..corp"])
    assert refused.value.code == 2 and "tenant name must be" in capsys.readouterr().err
    assert not (tmp_path / "store" / "_tenants").exists()


# ---------------------------------------------------------------- finding 10: admin CLI


def _cli_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "serve_config.yaml"
    args = {"models": [MODEL], "storage": {"kind": "local", "local_root": str(tmp_path / "store")}}
    config.write_text(yaml.safe_dump({"applications": [{"args": args}]}))
    return config


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    config = _cli_config(tmp_path, monkeypatch)

    def run(*argv) -> tuple[str, str]:
        assert admin.main(["--config", str(config), *argv]) == 0
        captured = capsys.readouterr()
        return captured.out.strip(), captured.err.strip()

    run.store = lambda: TenantStore(admin._store(config))
    return run


def test_revoke_key_refuses_an_ambiguous_or_unknown_prefix(cli, monkeypatch):
    cli("create-tenant", "beta")
    hashes = ["a1" + "0" * 62, "a2" + "0" * 62, "b1" + "0" * 62]
    tenant = asyncio.run(cli.store().get("beta"))
    tenant.key_hashes = hashes
    asyncio.run(cli.store().save(tenant))
    with pytest.raises(SystemExit, match="matches 2 keys of beta: nothing revoked"):
        cli("revoke-key", "beta", "--hash", "a")
    with pytest.raises(SystemExit, match="no key of beta"):
        cli("revoke-key", "beta", "--hash", "c")
    assert asyncio.run(cli.store().get("beta")).key_hashes == hashes  # nothing changed
    assert cli("revoke-key", "beta", "--hash", "a2")[0] == "revoked 1 key(s) of beta"
    assert asyncio.run(cli.store().get("beta")).key_hashes == [hashes[0], hashes[2]]


def test_admin_cli_issues_rotates_and_hides_webhook_secrets(cli, monkeypatch):
    secret, note = cli("create-tenant", "beta")
    assert secret.startswith("whsec_") and "not shown again" in note
    assert asyncio.run(cli.store().get("beta")).webhook_secret == secret
    shown = cli("show", "beta")[0]
    assert secret not in shown and json.loads(shown)["webhook_secret"] == "stored"
    rotated = cli("rotate-webhook-secret", "beta")[0]
    assert rotated.startswith("whsec_") and rotated != secret
    assert asyncio.run(cli.store().get("beta")).webhook_secret == rotated
    with pytest.raises(SystemExit, match="its own webhook secret"):
        cli("show-webhook-secret", "beta")
    # an environment tenant's secret is derived from the server key the deployment uses
    monkeypatch.setenv("IMG2IMG_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
    assert cli("show-webhook-secret", "tenant-a")[0] == derive_webhook_secret(WEBHOOK_SECRET, "tenant-a")


def _concurrent(tenants: list[TenantStore], changes) -> None:
    """Run each ``change`` through its own TenantStore.update in its own thread and event loop; the
    first call of each waits at a barrier, so both read the same version before either writes."""
    barrier = threading.Barrier(len(changes), timeout=10)
    errors: list[BaseException] = []

    def worker(store: TenantStore, change) -> None:
        calls = [0]

        def gated(current):
            calls[0] += 1
            if calls[0] == 1:
                barrier.wait()
            return change(current)

        try:
            asyncio.run(store.update("beta", gated))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(tenants, changes, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors


def _issue(key_hash):
    def change(tenant):
        tenant.key_hashes.append(key_hash)
        return tenant

    return change


def _revoke(key_hash):
    def change(tenant):
        tenant.key_hashes.remove(key_hash)
        return tenant

    return change


OLD, NEW = hash_key("sk-beta-old-key-000000000"), hash_key("sk-beta-new-key-111111111")


def concurrent_revocation_survives(stores: list[TenantStore]) -> list[str]:
    asyncio.run(stores[0].save(Tenant(name="beta", key_hashes=[OLD])))
    _concurrent(stores, [_revoke(OLD), _issue(NEW)])
    return asyncio.run(stores[0].get("beta")).key_hashes


def test_a_concurrent_revocation_is_not_lost_on_the_local_store(tmp_path):
    stores = [TenantStore(LocalObjectStore(tmp_path, "http://x", URL_SIGNING_KEY)) for _ in range(2)]
    assert concurrent_revocation_survives(stores) == [NEW]  # OLD revoked and NEW issued: both landed


def test_local_conditional_put_refuses_a_stale_version_and_a_second_create(tmp_path):
    store = LocalObjectStore(tmp_path, "http://x", URL_SIGNING_KEY)

    async def scenario():
        first = await store.put_if("_tenants/x.json", b"1", "application/json", version=None)
        with pytest.raises(ConcurrentWriteError):
            await store.put_if("_tenants/x.json", b"2", "application/json", version=None)
        data, version = await store.get_versioned("_tenants/x.json")
        assert (data, version) == (b"1", first)
        await store.put_if("_tenants/x.json", b"3", "application/json", version=version)
        with pytest.raises(ConcurrentWriteError):
            await store.put_if("_tenants/x.json", b"4", "application/json", version=version)
        assert await store.get("_tenants/x.json") == b"3"
        assert await store.list("") == ["_tenants/x.json"]  # the lock file is never listed

    asyncio.run(scenario())


def test_unconditional_saves_would_lose_the_revocation(tmp_path):
    """What the CLI did before: read, change, overwrite. The same interleaving loses one change."""
    stores = [TenantStore(LocalObjectStore(tmp_path, "http://x", URL_SIGNING_KEY)) for _ in range(2)]
    asyncio.run(stores[0].save(Tenant(name="beta", key_hashes=[OLD])))
    barrier = threading.Barrier(2, timeout=10)
    order = threading.Lock()

    def blind(store, change):
        tenant = asyncio.run(store.get("beta"))
        barrier.wait()
        with order:
            asyncio.run(store.save(change(tenant)))

    threads = [
        threading.Thread(target=blind, args=(s, c))
        for s, c in zip(stores, [_revoke(OLD), _issue(NEW)], strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert asyncio.run(stores[0].get("beta")).key_hashes in ([], [OLD, NEW])  # one change lost


# ---------------------------------------------------------------- finding 11: malformed tenant records


BAD_RECORDS = {
    "_tenants/garbage.json": b"{not json",
    "_tenants/acme..corp.json": json.dumps({"name": "acme..corp"}).encode(),
    "_tenants/typo.json": json.dumps({"name": "typo", "max_images_per_request": "many"}).encode(),
    "_tenants/extra.json": json.dumps({"name": "extra", "admin": True}).encode(),
    "_tenants/impostor.json": json.dumps({"name": "tenant-b", "key_hashes": [hash_key("x" * 20)]}).encode(),
    "_tenants/binary.json": b"\xff\xfe\x00",
    "_tenants/plain-key.json": json.dumps(
        {"name": "plain-key", "key_hashes": ["sk-plain-secret-key"]}
    ).encode(),
}


def test_a_malformed_tenant_record_is_skipped_and_reported_never_fatal(app, client, tenant_b, caplog):
    store = app.state.service.store
    for key, data in BAD_RECORDS.items():
        client.portal.call(store.put, key, data, "application/json")
    with caplog.at_level(logging.WARNING, logger="serve.tenancy.tenants"):
        client.portal.call(app.state.tenants.refresh)  # does not raise
        client.portal.call(app.state.tenants.refresh)  # reported once per change, not every refresh
    assert sorted(app.state.tenants.skipped) == sorted(BAD_RECORDS)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == len(BAD_RECORDS)
    assert "sk-plain-secret-key" not in " ".join(warnings)  # the reason names fields, never content
    # every good tenant still works over HTTP; the impostor did not replace tenant-b's keys
    assert client.post(URL, json=body(), headers=AUTH).status_code == 200
    assert client.post(URL, json=body(), headers=AUTH_B).status_code == 200
    bad = {"Authorization": f"Bearer {'x' * 20}"}
    assert_error(client.post(URL, json=body(), headers=bad), 401, "unauthorized")
    # fixed or deleted: the record is back, and that is logged too
    client.portal.call(store.delete, "_tenants/garbage.json")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve.tenancy.tenants"):
        client.portal.call(app.state.tenants.refresh)
    assert "_tenants/garbage.json" not in app.state.tenants.skipped
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_the_ingress_health_check_survives_a_malformed_record(tmp_path):
    from serve.deployments.ingress import Ingress

    store = LocalObjectStore(tmp_path, "http://x", URL_SIGNING_KEY)
    asyncio.run(store.put("_tenants/bad.json", b'{"name": 1}', "application/json"))
    catalog = TenantCatalog(TenantDirectory([]), TenantStore(store))
    wired = type("Wired", (), {"tenants": catalog, "limits": None})()
    shell = {"_wired": wired, "_bucket_ready": None, "_next_flush": 0.0, "_flush_usage": Ingress._flush_usage}
    replica = type("Replica", (), shell)()
    check = Ingress.check_health
    asyncio.run(check(replica))  # no exception: Serve would otherwise mark the replica unhealthy
    assert list(catalog.skipped) == ["_tenants/bad.json"]


# ---------------------------------------------------------------- finding 13: /files and API keys


@pytest.mark.parametrize(
    "key",
    [
        "_tenants/tenant-a.json",
        "_jobs/tenant-a/img_x.json",
        "_usage/tenant-a/2026-11-29.json",
        "tenant-a/2026/11/29/img_x/0.json",
        "tenant-a/2026/11/29/img_x/record.png",
        "tenant-a/0.png",
    ],
)
def test_files_serves_only_output_and_source_images_even_with_a_valid_signature(app, client, key):
    store = app.state.service.store
    client.portal.call(store.put, key, b'{"key_hashes": []}', "application/json")
    url = client.portal.call(store.url, key, 60)  # a genuine signature from the store's own key
    assert_error(client.get(url.removeprefix("http://testserver")), 404, "not_found")


def test_files_still_serves_outputs_and_stored_sources(app, client):
    store = app.state.service.store
    for key in (object_key(TENANT, "img_x", 0, "png"), object_key(TENANT, "img_x", "source", "jpeg")):
        client.portal.call(store.put, key, b"image-bytes", "image/png")
        response = client.get(client.portal.call(store.url, key, 60).removeprefix("http://testserver"))
        assert response.status_code == 200 and response.content == b"image-bytes"


@pytest.mark.parametrize(
    "key",
    ["a", "short-key-1", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab", "passwordpassword"],
)
def test_weak_api_keys_are_refused_at_start_up_with_a_lesson(monkeypatch, key):
    monkeypatch.setenv("IMG2IMG_API_KEYS", json.dumps({key: "acme"}))
    with pytest.raises(ValidationError) as caught:
        Secrets()
    message = str(caught.value)
    assert "tenant 'acme'" in message and "at least 16 characters" in message
    assert "img2img-admin issue-key" in message and f"'{key}'" not in message  # names the tenant, not the key
    monkeypatch.delenv("IMG2IMG_API_KEYS")
    monkeypatch.setenv("IMG2IMG_DEV_API_KEY", key if len(key) >= 8 else key * 8)
    with pytest.raises(ValidationError):
        Secrets()


def test_generated_keys_pass_the_key_policy():
    import secrets as random_source

    from serve.tenancy.tenants import new_key

    for _ in range(20000):  # the estimate's spread for random keys reaches down to ~44 bits
        check_api_key(random_source.token_urlsafe(12), "t")  # 16 random characters: the floor
        check_api_key(new_key("acme"), "acme")
    assert key_strength_bits("a") == 0 and key_strength_bits("abcd" * 4) == 32


def test_show_webhook_secret_points_a_config_tenant_at_its_configured_secret(tmp_path, monkeypatch):
    """A tenant defined in the Serve config with its own secret signs with that one: the CLI must not
    print a derived secret that its receivers would reject."""
    config = _cli_config(tmp_path, monkeypatch)
    document = yaml.safe_load(config.read_text())
    document["applications"][0]["args"]["tenants"] = [
        {"name": "gamma", "key_hashes": ["c" * 64], "webhook_secret": "whsec_" + "g" * 40}
    ]
    config.write_text(yaml.safe_dump(document))
    monkeypatch.setenv("IMG2IMG_WEBHOOK_SECRET", WEBHOOK_SECRET.decode())
    with pytest.raises(SystemExit, match=r"own webhook secret in .*args\.tenants"):
        admin.main(["--config", str(config), "show-webhook-secret", "gamma"])


def test_new_webhook_secrets_are_standard_webhooks_secrets_and_old_ones_verify_respelled():
    from standardwebhooks import Webhook

    from serve.tenancy.tenants import new_webhook_secret

    fresh = new_webhook_secret()
    assert fresh.startswith("whsec_") and len(Webhook(fresh)._whsecret) == 32  # base64 of 32 random bytes
    legacy = "whsec_" + "Ab-_" * 10 + "xyz"  # the URL-safe alphabet secrets were issued in before
    now = int(time.time())
    headers = {
        "webhook-id": "m",
        "webhook-timestamp": str(now),
        "webhook-signature": sign(legacy.encode(), "m", now, b"{}"),
    }
    respelled = legacy.replace("-", "+").replace("_", "/").replace("whsec/", "whsec_")
    assert receiver_verifies(respelled, b"{}", headers)  # the README's instruction for receivers
