"""Tenants: who may call, with which keys, and within which limits.

Keys are stored only as SHA-256 hashes and compared in constant time. Tenants come from three places,
merged by name (later wins): the Serve config (``args.tenants``), the environment (``IMG2IMG_API_KEYS``
and the local run's ``IMG2IMG_DEV_API_KEY``, with default limits) and the object store
(``_tenants/{name}.json``, written by the admin CLI ``img2img-admin``). Ingress replicas re-read the
store every few seconds, so a rotated or revoked key takes effect without a redeploy.

A tenant's name is the first segment of every object key it owns, so one rule (``check_tenant_name``,
the object-key rule plus a leading letter or digit and at most 64 characters) is enforced wherever a
tenant is created: the Serve config, ``IMG2IMG_API_KEYS`` and the admin CLI. Stored tenant files are
written with conditional puts (``TenantStore.update``), so two admins editing one tenant at once cannot
lose each other's change, and a malformed stored file is skipped and reported, never fatal.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import random
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.errors import AuthError, StorageUnavailableError
from serve.storage.objects import (
    ConcurrentWriteError,
    ObjectNotFoundError,
    ObjectStore,
    object_key,
)
from serve.tenancy.keys import hash_key

TENANTS_PREFIX = "_tenants/"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
NAME_RULE = "1-64 of [A-Za-z0-9._-], starting with a letter or digit, without '..'"
logger = logging.getLogger("serve.tenancy.tenants")


def check_tenant_name(name: object) -> str:
    """``name`` if it is a valid tenant name, else ValueError naming the rule.

    The rule is the object-key rule (the name is the first segment of every key the tenant owns; a
    name the key builder refuses would make every request of that tenant fail) narrowed to 64
    characters and a leading letter or digit. ``object_key`` itself has the last word, so the two
    rules cannot drift apart."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"tenant name must be {NAME_RULE}, got {name!r}")
    try:
        object_key(name, "img_check", 0, "png")
    except ValueError:
        raise ValueError(f"tenant name must be {NAME_RULE} (a valid object-key segment)") from None
    return name


def new_webhook_secret() -> str:
    """A fresh per-tenant webhook signing secret (shown once by the admin CLI, stored in the tenant)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()  # Standard Webhooks' form


def new_key(tenant: str) -> str:
    """A fresh API key: the tenant's name as a readable prefix, then 32 random URL-safe characters."""
    return f"sk-{tenant}-{secrets.token_urlsafe(24)}"


class Prices(BaseModel):
    """What a plan charges: per image, per denoising step and per model-second (the job's measured
    share of batched model time), in one currency. Every job and ``/v1/usage`` then carry a ``cost``."""

    model_config = ConfigDict(extra="forbid")

    currency: str = Field("USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 code")
    per_image: float = Field(0.0, ge=0)
    per_step: float = Field(0.0, ge=0)
    per_model_second: float = Field(0.0, ge=0)

    def cost(self, usage: Mapping[str, float]) -> dict[str, Any]:
        amount = (
            self.per_image * usage.get("images", 0.0)
            + self.per_step * usage.get("steps", 0.0)
            + self.per_model_second * usage.get("compute_seconds", 0.0)
        )
        return {"amount": round(amount, 6), "currency": self.currency}


class Tenant(BaseModel):
    """One customer. Persisted as JSON (so ``webhook_secret`` stays a plain string), yet never printed:
    the secret is left out of ``repr`` and validation errors do not echo inputs (a plain key pasted
    into ``key_hashes`` would otherwise be quoted back into logs)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    name: str
    key_hashes: list[str] = Field(default_factory=list, description="sha256 hex of each valid API key")
    allowed_models: list[str] | None = Field(None, description="None: every configured model")
    max_images_per_request: int = Field(8, ge=1, le=64)
    rate_limit_images_per_minute: float | None = Field(None, gt=0)
    concurrency_limit: int | None = Field(None, ge=1, description="requests in flight at once")
    webhook_secret: str | None = Field(
        None, min_length=16, repr=False, description="signs this tenant's webhooks"
    )
    retention_days: int = Field(30, ge=1, le=3650)
    prices: Prices | None = Field(None, description="what the plan charges; None: no cost is reported")
    priority: Literal["low", "normal", "high"] = Field(
        "normal", description="admission lane of this plan's calls; a call may lower its own, never raise it"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_tenant_name(value)

    @field_validator("key_hashes")
    @classmethod
    def _hashes(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not _SHA256.fullmatch(v)]
        if bad:
            raise ValueError(
                "key_hashes must be sha256 hex digests (64 lowercase hex chars); never plain keys"
            )
        return values

    def allows_model(self, model_id: str) -> bool:
        return self.allowed_models is None or model_id in self.allowed_models


class TenantDirectory:
    """Tenants by name and by key hash; swapped atomically when the store is re-read."""

    def __init__(self, tenants: Iterable[Tenant]) -> None:
        self._by_name: dict[str, Tenant] = {}
        for tenant in tenants:
            self._by_name[tenant.name] = tenant
        self._owner_by_hash = {h: t.name for t in self._by_name.values() for h in t.key_hashes}

    @classmethod
    def from_plain_keys(cls, keys: Mapping[str, str], base: Iterable[Tenant] = ()) -> TenantDirectory:
        """Add ``{plain key: tenant}`` (environment keys) to ``base``; unknown tenants get default limits."""
        tenants = {t.name: t.model_copy(deep=True) for t in base}
        for key, name in keys.items():
            tenant = tenants.setdefault(name, Tenant(name=name))
            tenant.key_hashes.append(hash_key(key))
        return cls(tenants.values())

    def merged(self, tenants: Iterable[Tenant]) -> TenantDirectory:
        return TenantDirectory([*self._by_name.values(), *tenants])

    def lookup(self, name: str) -> Tenant | None:
        """The same as ``get``: a directory answers what a ``TenantCatalog`` answers."""
        return self.get(name)

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Tenant | None:
        return self._by_name.get(name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an ``Authorization: Bearer <key>`` header, or AuthError (401)."""
        if not (authorization or "").strip():
            raise AuthError(
                "missing API key: send the header 'Authorization: Bearer <key>'", param="Authorization"
            )
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthError(
                "malformed Authorization header: expected 'Authorization: Bearer <key>'",
                param="Authorization",
            )
        candidate, owner = hash_key(key.strip()), None
        for stored, name in self._owner_by_hash.items():  # no early exit: timing says nothing
            if hmac.compare_digest(stored, candidate):
                owner = name
        if owner is None:
            raise AuthError("invalid API key", param="Authorization")
        return self._by_name[owner]

    def tenant_for(self, authorization: str | None) -> str:
        return self.authenticate(authorization).name


class TenantStore:
    """Tenants persisted in the object store (what the admin CLI edits).

    ``update`` is the safe way to change one: read with the object's version, change, write only if
    the version is unchanged (a conditional put), else read again and re-apply. ``save`` overwrites
    unconditionally (tests and one-off seeding)."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self.skipped: dict[str, str] = {}  # key -> why, from the last load_all

    @staticmethod
    def key(name: str) -> str:
        return f"{TENANTS_PREFIX}{check_tenant_name(name)}.json"

    @staticmethod
    def encode(tenant: Tenant) -> bytes:
        return json.dumps(tenant.model_dump(), indent=2).encode()

    async def load_all(self) -> list[Tenant]:
        """Every valid stored tenant. A malformed record is skipped and listed in ``skipped`` (its key
        and the field that failed, never its content); only a storage outage raises."""
        tenants, skipped = [], {}
        for key in await self.store.list(TENANTS_PREFIX):
            if not key.endswith(".json"):
                continue
            try:
                tenant = Tenant.model_validate_json(await self.store.get(key))
                if key != f"{TENANTS_PREFIX}{tenant.name}.json":
                    raise _MisnamedRecord(f"the record names another tenant ({tenant.name!r})")
            except (StorageUnavailableError, asyncio.CancelledError):
                raise  # keep the last good directory rather than dropping every stored tenant
            except ObjectNotFoundError:
                continue  # deleted between list and get
            except Exception as error:  # one bad record must never take the others down
                skipped[key] = _reason(error)
                continue
            tenants.append(tenant)
        self.skipped = skipped
        return tenants

    async def get(self, name: str) -> Tenant | None:
        try:
            return Tenant.model_validate_json(await self.store.get(self.key(name)))
        except ObjectNotFoundError:
            return None

    async def save(self, tenant: Tenant) -> None:
        await self.store.put(self.key(tenant.name), self.encode(tenant), "application/json")

    async def update(
        self, name: str, change: Callable[[Tenant | None], Tenant], *, attempts: int = 10
    ) -> Tenant:
        """Apply ``change`` (current tenant or None -> new tenant) with optimistic concurrency.

        ``change`` may run more than once (after a concurrent write) and may raise to abort; it gets a
        fresh copy each time. Raises ConcurrentWriteError if the record kept changing."""
        key = self.key(name)
        for attempt in range(attempts):
            try:
                data, version = await self.store.get_versioned(key)
                current: Tenant | None = Tenant.model_validate_json(data)
            except ObjectNotFoundError:
                current, version = None, None
            tenant = change(current)
            if tenant.name != name:
                raise ValueError(f"a change to tenant {name!r} may not rename it")
            try:
                await self.store.put_if(key, self.encode(tenant), "application/json", version=version)
                return tenant
            except ConcurrentWriteError:
                await asyncio.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
        raise ConcurrentWriteError(f"tenant {name!r} kept changing under us ({attempts} tries); run it again")


class _MisnamedRecord(ValueError):
    """``_tenants/a.json`` holding tenant ``b``: it could otherwise replace b's keys."""


def _reason(error: Exception) -> str:
    """Why a stored record is unusable, without echoing its content (it may hold a secret)."""
    if isinstance(error, _MisnamedRecord):
        return str(error)
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            parts = [
                f"{'.'.join(str(p) for p in e.get('loc', ())) or 'record'}: {e.get('msg', '')}"
                for e in errors(include_input=False)
            ]
            return "; ".join(parts)[:300]
        except Exception:  # an odd error object: fall back to its type
            return type(error).__name__
    return type(error).__name__


def _skipped_gauge():
    """A Ray gauge inside a Serve replica; None elsewhere (unit tests, the admin CLI)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        from ray.serve.metrics import Gauge

        return Gauge(
            "img2img_tenant_records_skipped",
            description="Stored tenant records skipped as malformed at the last refresh",
        )
    except Exception:  # a metric must never break a refresh
        return None


class TenantCatalog:
    """The live tenant directory of one process: configured tenants plus those in the store.

    ``refresh`` re-reads the store (the ingress and coordinator call it from their periodic health
    check), so keys issued, rotated or revoked with the admin CLI apply within seconds.
    """

    def __init__(self, configured: TenantDirectory, store: TenantStore | None) -> None:
        self._configured = configured
        self._store = store
        self.directory = configured
        self.skipped: dict[str, str] = {}  # stored records left out at the last refresh, and why
        self._gauge = None

    async def refresh(self) -> None:
        """Re-read the store. Malformed records are skipped, logged (once per change) and counted in
        ``img2img_tenant_records_skipped``; a storage outage raises StorageUnavailableError (an
        InferenceError) and keeps the previous directory."""
        if self._store is None:
            return
        tenants = await self._store.load_all()
        self.directory = self._configured.merged(tenants)
        skipped = dict(self._store.skipped)
        if skipped != self.skipped:
            for key, reason in skipped.items():
                if self.skipped.get(key) != reason:
                    logger.warning("tenant record %s skipped (fix or delete it): %s", key, reason)
            for key in self.skipped.keys() - skipped.keys():
                logger.warning("tenant record %s is readable again (or gone)", key)
            self.skipped = skipped
        self._gauge = self._gauge or _skipped_gauge()
        if self._gauge is not None:
            self._gauge.set(len(skipped))

    def lookup(self, name: str) -> Tenant | None:
        return self.directory.get(name)

    def all(self) -> list[Tenant]:
        """Every tenant known now (configured, environment and stored)."""
        return [self.directory.get(name) for name in self.directory.names]

    def tenant_for(self, authorization: str | None) -> str:
        return self.directory.tenant_for(authorization)
