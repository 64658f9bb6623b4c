"""``img2img-admin``: manage tenants and keys in the object store, and read their usage.

Changes are written to ``_tenants/{name}.json`` in the deployment's store (the one its Serve config
and ``IMG2IMG_S3_*`` environment name); running replicas pick them up within seconds. A new key is
printed exactly once: only its SHA-256 hash is stored.

    img2img-admin --config cluster/serve_config.yaml create-tenant acme --rate 120 --concurrency 8
                                            # prints the tenant's webhook secret once
    img2img-admin issue-key acme            # prints the new key once
    img2img-admin rotate-key acme           # new key; old keys stay valid until revoke-key --all-but-newest
    img2img-admin revoke-key acme --hash 3f2a9c   (a prefix of the hash shown by `show`; must match one)
    img2img-admin rotate-webhook-secret acme    # prints the new webhook secret once; the old one stops
    img2img-admin show-webhook-secret acme      # the derived secret of an environment/config tenant
    img2img-admin show acme
    img2img-admin usage acme --start 2026-11-01T00:00 --end 2026-11-21T00:00

Every change is a read-modify-write with a conditional put (ETag ``If-Match`` on S3, a file lock on the
local store): two admins changing one tenant at once both land, or one is told to run it again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from serve.config import AppArgs, Secrets, build_store
from serve.jobs.webhooks import derive_webhook_secret
from serve.tenancy.governor import TenantGovernor
from serve.tenancy.keys import hash_key
from serve.tenancy.tenants import Tenant, TenantStore, check_tenant_name, new_key, new_webhook_secret

SHOWN_ONCE = "store it now: it is not shown again"


def _app_args(config: Path) -> AppArgs:
    document = yaml.safe_load(config.read_text())
    return AppArgs.model_validate(document["applications"][0]["args"])


def _store(config: Path):
    os.environ.setdefault("IMG2IMG_URL_SIGNING_KEY", secrets.token_urlsafe(24))  # the CLI signs no URLs
    return build_store(_app_args(config), Secrets())


def _existing(name: str) -> Callable[[Tenant | None], Tenant]:
    def check(tenant: Tenant | None) -> Tenant:
        if tenant is None:
            raise SystemExit(f"no tenant {name!r} in the store; create it with create-tenant")
        return tenant

    return check


def _revoke(tenant: Tenant, prefix: str | None, all_but_newest: bool) -> Tenant:
    """The tenant without the keys named; refuses a prefix that matches no key or more than one."""
    if all_but_newest:
        tenant.key_hashes = tenant.key_hashes[-1:]
    elif prefix:
        prefix = prefix.strip().lower()
        matches = [h for h in tenant.key_hashes if h.startswith(prefix)]
        if not matches:
            raise SystemExit(f"no key of {tenant.name} has a hash starting with {prefix!r}; see `show`")
        if len(matches) > 1:
            raise SystemExit(
                f"--hash {prefix!r} matches {len(matches)} keys of {tenant.name}: nothing revoked; "
                "give a longer prefix (`show` lists 12 characters of each)"
            )
        tenant.key_hashes = [h for h in tenant.key_hashes if h != matches[0]]
    else:
        raise SystemExit("say which keys: --hash PREFIX or --all-but-newest")
    return tenant


async def _run(args: argparse.Namespace) -> int:
    store = _store(args.config)
    tenants = TenantStore(store)
    existing = _existing(args.name) if hasattr(args, "name") else None
    if args.command == "create-tenant":
        secret = new_webhook_secret()

        def create(current: Tenant | None) -> Tenant:
            if current is not None:
                raise SystemExit(f"tenant {args.name!r} already exists")
            return Tenant(
                name=args.name,
                allowed_models=args.models,
                max_images_per_request=args.max_images,
                rate_limit_images_per_minute=args.rate,
                concurrency_limit=args.concurrency,
                retention_days=args.retention_days,
                webhook_secret=secret,
            )

        tenant = await tenants.update(args.name, create)
        print(secret)
        print(
            f"created tenant {tenant.name}; above is its webhook secret ({SHOWN_ONCE}); "
            f"issue a key with: img2img-admin issue-key {tenant.name}",
            file=sys.stderr,
        )
    elif args.command in ("issue-key", "rotate-key"):
        key = new_key(args.name)

        def add_key(current: Tenant | None) -> Tenant:
            tenant = existing(current)
            tenant.key_hashes.append(hash_key(key))
            return tenant

        await tenants.update(args.name, add_key)
        print(key)
        note = SHOWN_ONCE
        if args.command == "rotate-key":
            note += "; old keys stay valid until `revoke-key --all-but-newest`"
        print(note, file=sys.stderr)
    elif args.command == "revoke-key":
        counts: list[int] = []

        def revoke(current: Tenant | None) -> Tenant:
            tenant = existing(current)
            before = len(tenant.key_hashes)
            tenant = _revoke(tenant, args.hash, args.all_but_newest)
            counts.append(before - len(tenant.key_hashes))
            return tenant

        tenant = await tenants.update(args.name, revoke)
        print(f"revoked {counts[-1]} key(s) of {tenant.name}")
    elif args.command == "rotate-webhook-secret":
        secret = new_webhook_secret()

        def rotate(current: Tenant | None) -> Tenant:
            tenant = existing(current)
            tenant.webhook_secret = secret
            return tenant

        await tenants.update(args.name, rotate)
        print(secret)
        print(f"{SHOWN_ONCE}; deliveries are signed with it from the next refresh on", file=sys.stderr)
    elif args.command == "show-webhook-secret":
        configured = next((t for t in _app_args(args.config).tenants if t.name == args.name), None)
        if configured is not None and configured.webhook_secret:
            raise SystemExit(
                f"tenant {args.name!r} has its own webhook secret in {args.config} "
                "(args.tenants[].webhook_secret): its receivers verify with that value"
            )
        stored = await tenants.get(args.name)
        if stored is not None and stored.webhook_secret:
            raise SystemExit(
                f"tenant {args.name!r} has its own webhook secret, shown once when it was made; "
                "to replace it: img2img-admin rotate-webhook-secret"
            )
        server_key = Secrets().webhook_secret
        if server_key is None:
            raise SystemExit("set IMG2IMG_WEBHOOK_SECRET (the server key the deployment uses) to derive it")
        print(derive_webhook_secret(server_key.get_secret_value().encode(), args.name))
    elif args.command == "show":
        tenant = existing(await tenants.get(args.name))
        shown = tenant.model_dump(exclude={"webhook_secret"})
        shown["key_hashes"] = [h[:12] for h in tenant.key_hashes]
        shown["webhook_secret"] = "stored" if tenant.webhook_secret else "derived from IMG2IMG_WEBHOOK_SECRET"
        print(json.dumps(shown, indent=2))
    elif args.command == "usage":
        end = args.end or datetime.now(UTC)
        start = args.start or end - timedelta(days=1)
        totals = await TenantGovernor(store=store).usage(args.name, start, end)
        print(json.dumps({"tenant": args.name, "start": start.isoformat(), "end": end.isoformat(), **totals}))
    return 0


def _name(value: str) -> str:
    try:
        return check_tenant_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="img2img-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("cluster/serve_config.yaml"), help="Serve config")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-tenant", help="add a tenant with limits")
    create.add_argument("name", type=_name)
    create.add_argument("--models", nargs="*", help="allowed model ids (default: all)")
    create.add_argument("--max-images", type=int, default=8)
    create.add_argument("--rate", type=float, help="images per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight at once")
    create.add_argument("--retention-days", type=int, default=30)
    for name in ("issue-key", "rotate-key", "show", "rotate-webhook-secret", "show-webhook-secret"):
        commands.add_parser(name).add_argument("name", type=_name)
    revoke = commands.add_parser("revoke-key")
    revoke.add_argument("name", type=_name)
    revoke.add_argument("--hash", help="prefix of the key hash to revoke (see `show`)")
    revoke.add_argument("--all-but-newest", action="store_true")
    usage = commands.add_parser("usage")
    usage.add_argument("name", type=_name)
    usage.add_argument("--start", type=_time)
    usage.add_argument("--end", type=_time)
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
