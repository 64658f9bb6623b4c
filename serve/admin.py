"""``img2img-admin``: manage tenants and keys in the object store, and read their usage.

Changes are written to ``_tenants/{name}.json`` in the deployment's store (the one its Serve config
and ``IMG2IMG_S3_*`` environment name); running replicas pick them up within seconds. A new key is
printed exactly once: only its SHA-256 hash is stored.

    img2img-admin --config cluster/serve_config.yaml create-tenant acme --rate 120 --concurrency 8
    img2img-admin issue-key acme            # prints the new key once
    img2img-admin rotate-key acme           # new key; old keys stay valid until revoke-key --all-but-newest
    img2img-admin revoke-key acme --hash 3f2a9c   (a prefix of the hash shown by `show`)
    img2img-admin show acme
    img2img-admin usage acme --start 2026-11-01T00:00 --end 2026-11-21T00:00
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from serve.auth import hash_key
from serve.config import AppArgs, Secrets, build_store
from serve.governor import TenantGovernor
from serve.tenants import Tenant, TenantStore, new_key


def _store(config: Path):
    document = yaml.safe_load(config.read_text())
    args = AppArgs.model_validate(document["applications"][0]["args"])
    os.environ.setdefault("IMG2IMG_URL_SIGNING_KEY", secrets.token_urlsafe(24))  # the CLI signs no URLs
    return build_store(args, Secrets())


async def _tenant(tenants: TenantStore, name: str) -> Tenant:
    tenant = await tenants.get(name)
    if tenant is None:
        raise SystemExit(f"no tenant {name!r} in the store; create it with create-tenant")
    return tenant


async def _run(args: argparse.Namespace) -> int:
    store = _store(args.config)
    tenants = TenantStore(store)
    if args.command == "create-tenant":
        if await tenants.get(args.name) is not None:
            raise SystemExit(f"tenant {args.name!r} already exists")
        tenant = Tenant(
            name=args.name,
            allowed_models=args.models,
            max_images_per_request=args.max_images,
            rate_limit_images_per_minute=args.rate,
            concurrency_limit=args.concurrency,
            retention_days=args.retention_days,
        )
        await tenants.save(tenant)
        print(f"created tenant {tenant.name}; issue a key with: img2img-admin issue-key {tenant.name}")
    elif args.command in ("issue-key", "rotate-key"):
        tenant = await _tenant(tenants, args.name)
        key = new_key(tenant.name)
        tenant.key_hashes.append(hash_key(key))
        await tenants.save(tenant)
        print(key)
        note = "store it now: it is not shown again"
        if args.command == "rotate-key":
            note += "; old keys stay valid until `revoke-key --all-but-newest`"
        print(note, file=sys.stderr)
    elif args.command == "revoke-key":
        tenant = await _tenant(tenants, args.name)
        before = len(tenant.key_hashes)
        if args.all_but_newest:
            tenant.key_hashes = tenant.key_hashes[-1:]
        elif args.hash:
            tenant.key_hashes = [h for h in tenant.key_hashes if not h.startswith(args.hash)]
        else:
            raise SystemExit("say which keys: --hash PREFIX or --all-but-newest")
        await tenants.save(tenant)
        print(f"revoked {before - len(tenant.key_hashes)} key(s) of {tenant.name}")
    elif args.command == "show":
        tenant = await _tenant(tenants, args.name)
        shown = tenant.model_dump(exclude={"webhook_secret"})
        shown["key_hashes"] = [h[:12] for h in tenant.key_hashes]
        print(json.dumps(shown, indent=2))
    elif args.command == "usage":
        end = args.end or datetime.now(UTC)
        start = args.start or end - timedelta(days=1)
        totals = await TenantGovernor(store=store).usage(args.name, start, end)
        print(json.dumps({"tenant": args.name, "start": start.isoformat(), "end": end.isoformat(), **totals}))
    return 0


def _time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="img2img-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("cluster/serve_config.yaml"), help="Serve config")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create-tenant", help="add a tenant with limits")
    create.add_argument("name")
    create.add_argument("--models", nargs="*", help="allowed model ids (default: all)")
    create.add_argument("--max-images", type=int, default=8)
    create.add_argument("--rate", type=float, help="images per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight at once")
    create.add_argument("--retention-days", type=int, default=30)
    for name in ("issue-key", "rotate-key", "show"):
        commands.add_parser(name).add_argument("name")
    revoke = commands.add_parser("revoke-key")
    revoke.add_argument("name")
    revoke.add_argument("--hash", help="prefix of the key hash to revoke (see `show`)")
    revoke.add_argument("--all-but-newest", action="store_true")
    usage = commands.add_parser("usage")
    usage.add_argument("name")
    usage.add_argument("--start", type=_time)
    usage.add_argument("--end", type=_time)
    return asyncio.run(_run(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
