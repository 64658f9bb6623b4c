"""Application configuration, validated at start-up with errors that teach.

``AppArgs`` is the ``args`` block of the Serve config YAML (``cluster/serve_config.yaml``), the one
source of truth that the local run, the Ray cluster and KubeRay's ``serveConfigV2`` share. Secrets
and endpoints that differ per environment come from environment variables (``Secrets``), never
from the YAML, and placeholder values are refused.

Secrets never print: ``Secrets`` holds them as ``SecretStr`` (``repr``/``str`` show ``**********``),
plain API keys are left out of its repr, and no config model echoes its input in a validation error
(those errors travel to Serve's application status, controller logs and the RayService status, and a
tenant's webhook secret or a plain key pasted where a hash belongs must not ride along). The error
still names the field and the rule.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from inference.engine_config import EngineConfig, OptimizeConfig
from inference.images import MAX_OUTPUT_SIDE
from inference.models import GUIDED_ROWS, Family, ModelRegistry
from serve.middleware.cors import CorsPolicy
from serve.storage.objects import LocalObjectStore, S3ObjectStore
from serve.tenancy.tenants import Tenant, TenantDirectory, check_tenant_name

PLACEHOLDERS = {"changeme", "change-me", "changethis", "secret", "password", "placeholder", "xxx", "todo"}
MIN_API_KEY_LENGTH = 16
#: A random 16-character URL-safe key scores 44.5-64 (lowest of 100,000 draws: 44.5; 1 %: 54), so the
#: floor sits below that spread; repeated text (``passwordpassword``: 44) is caught by ``_repeats``.
MIN_API_KEY_BITS = 40
KEY_HINT = (
    "generate keys with `img2img-admin issue-key TENANT` (stored tenants) or "
    "`python -c \"import secrets; print('sk-' + secrets.token_urlsafe(24))\"`"
)


def key_strength_bits(key: str) -> float:
    """A cheap entropy estimate: length x the Shannon entropy of the key's own characters. It catches
    short, repeated and low-variety keys (``aaaa...``, ``abab...``, ``passwordpassword``); it cannot
    tell a dictionary phrase from randomness, so generate keys rather than type them."""
    counts = Counter(key)
    return -sum(n * math.log2(n / len(key)) for n in counts.values()) if key else 0.0


def _repeats(key: str) -> bool:
    """True when the key is a shorter string written out several times (``abab…``, ``pwpw``)."""
    return any(len(key) % n == 0 and key == key[:n] * (len(key) // n) for n in range(1, len(key) // 2 + 1))


def check_api_key(key: str, owner: str) -> None:
    """Start-up policy for keys given in plain (``IMG2IMG_API_KEYS``, ``IMG2IMG_DEV_API_KEY``); the
    error names the tenant, never the key."""
    bits = key_strength_bits(key)
    weak = len(key) < MIN_API_KEY_LENGTH or bits < MIN_API_KEY_BITS or _repeats(key)
    if weak or key.strip().lower() in PLACEHOLDERS:
        raise ValueError(
            f"the API key of tenant {owner!r} is too weak ({len(key)} characters, ~{bits:.0f} bits "
            f"estimated): keys need at least {MIN_API_KEY_LENGTH} characters and ~{MIN_API_KEY_BITS} bits "
            f"(no long repeats); {KEY_HINT}"
        )


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class ReplicaScaling(_Strict):
    """Serve autoscaling for one deployment; ``target_ongoing_requests`` near the engine's cap."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(10, ge=0)
    downscale_delay_s: float = Field(120, ge=0)
    look_back_period_s: float = Field(30, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ReplicaScaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        config = self.model_dump(exclude_none=True)
        return config


def _valid_fields(block: str, config_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` builds a valid ``config_class`` (a dataclass that checks itself), or a teaching error."""
    unknown = set(values) - set(config_class.__dataclass_fields__)
    if unknown:
        allowed = ", ".join(config_class.__dataclass_fields__)
        raise ValueError(f"unknown {block} field(s) {sorted(unknown)}; allowed: {allowed}")
    try:
        config_class(**values)
    except TypeError as error:  # e.g. a list where pairs were expected
        raise ValueError(f"{block}: {error}") from None
    return values


class ModelDeployment(_Strict):
    """One model: what to load (``spec``), how to batch (``engine``) and where to run it."""

    spec: dict[str, Any]
    engine: dict[str, Any] = Field(default_factory=dict, description="EngineConfig: Serve user_config")
    optimize: dict[str, Any] = Field(
        default_factory=dict,
        description="OptimizeConfig: channels_last, compile mode, row_buckets, warmup_sizes (load time)",
    )
    scaling: ReplicaScaling = ReplicaScaling()
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on CPU clusters)")
    num_cpus: float = Field(1, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    max_ongoing_requests: int | None = Field(None, ge=1, description="default: 3x the engine's cap")
    max_queued_requests: int = Field(64, ge=1, description="per handle; beyond it callers get 503")
    torch_threads: int | None = Field(None, ge=1)
    health_check_timeout_s: float = Field(60, gt=0)
    graceful_shutdown_timeout_s: float = Field(60, ge=0)

    @field_validator("spec")
    @classmethod
    def _valid_spec(cls, spec: dict[str, Any]) -> dict[str, Any]:
        ModelRegistry.from_config([spec])
        return spec

    @field_validator("engine")
    @classmethod
    def _valid_engine(cls, engine: dict[str, Any]) -> dict[str, Any]:
        return _valid_fields("engine", EngineConfig, engine)

    @field_validator("optimize")
    @classmethod
    def _valid_optimize(cls, optimize: dict[str, Any]) -> dict[str, Any]:
        return _valid_fields("optimize", OptimizeConfig, optimize)

    @model_validator(mode="after")
    def _buckets_hold_one_sample(self) -> ModelDeployment:
        """A sample wider than the largest bucket would run unpadded: a shape warm-up never saw."""
        buckets = self.optimize.get("row_buckets")
        family = Family(self.spec["family"])  # _valid_spec checked it
        rows = GUIDED_ROWS[family]
        if buckets and max(buckets) < rows:
            raise ValueError(
                f"model {self.spec['id']!r}: optimize.row_buckets = {list(buckets)}; the largest bucket "
                f"must hold one guided sample of family {family.value} ({rows} rows)"
            )
        return self

    @property
    def optimize_config(self) -> OptimizeConfig:
        return OptimizeConfig(**self.optimize)

    @property
    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.engine)

    @property
    def deployment_name(self) -> str:
        return f"model-{self.spec['id']}"

    @property
    def ongoing_limit(self) -> int:
        """Enough requests in each replica to keep its batch full while others finish (2-4x the cap)."""
        return self.max_ongoing_requests or 3 * self.engine_config.max_batch_samples


class IngressDeployment(_Strict):
    scaling: ReplicaScaling = ReplicaScaling(min_replicas=1, max_replicas=2, target_ongoing_requests=32)
    num_cpus: float = Field(0.5, ge=0)
    max_ongoing_requests: int = Field(128, ge=1)
    max_queued_requests: int = Field(512, ge=1)


class StorageArgs(_Strict):
    """Where outputs go: ``local`` (a folder served by the ingress) or ``s3`` (MinIO or any S3)."""

    kind: Literal["local", "s3"] = "local"
    local_root: str = "var/outputs"
    public_base_url: str = Field("http://127.0.0.1:8000", description="how clients reach the ingress")
    bucket: str = "img2img-outputs"
    url_expiry_s: int = Field(3600, ge=60, le=7 * 24 * 3600)


class FetchArgs(_Strict):
    """Source-image downloads: private address ranges are refused unless listed here (tests only)."""

    allow_networks: tuple[str, ...] = ()
    timeout_s: float = Field(20, gt=0)


class WebhookArgs(_Strict):
    """Delivery of job webhooks: bounded attempts with exponential backoff."""

    max_attempts: int = Field(5, ge=1, le=20)
    first_delay_s: float = Field(1.0, ge=0)
    max_delay_s: float = Field(60.0, ge=0)
    timeout_s: float = Field(10.0, gt=0)
    shared_secret: bool = Field(
        False,
        description=(
            "opt in to sign with IMG2IMG_WEBHOOK_SECRET itself for tenants without their own secret "
            "(every such tenant can then forge the others' deliveries); default: a per-tenant secret "
            "derived from it"
        ),
    )
    # Transport policy (serve.jobs.webhooks): targets must be https; a plain-http target is refused with a
    # 400 at submission unless it is a literal address inside fetch.allow_networks (tests, labs).
    allow_plain_http: bool = Field(
        False,
        description=(
            "deliver webhooks to plain-http targets too (signed job results and image links then travel "
            "unencrypted); off by default: http webhook_url values are refused with a 400"
        ),
    )


class ControlPlaneArgs(_Strict):
    """Where per-tenant limits, usage counters and job leases live.

    ``local`` (the embedded default): one tenant-governor replica and one job coordinator, nothing to
    run beside Ray. ``redis``: limits are atomic scripts in Redis called from every ingress replica
    (no governor hop), usage is counted there and flushed to the object store, and job coordinators
    scale out, each job held by a lease; the address is ``IMG2IMG_REDIS_URL`` (a secret: it carries
    the password). Production runs one Redis for this and for Ray's GCS fault tolerance.
    """

    kind: Literal["local", "redis"] = "local"
    slot_ttl_s: float = Field(
        900, gt=0, description="a concurrency slot never released (its ingress crashed) expires after this"
    )
    lease_s: float = Field(
        15, ge=1, le=300, description="a job lease; another coordinator resumes a dead one's jobs within this"
    )
    coordinators: ReplicaScaling = ReplicaScaling(min_replicas=1, max_replicas=4, target_ongoing_requests=64)


class OpenAIArgs(_Strict):
    """The OpenAI-compatible API: client-facing model names (``gpt-image-1``, ``dall-e-2``) mapped to
    served model ids, so OpenAI code runs unchanged with only ``base_url`` and the key changed."""

    model_aliases: dict[str, str] = Field(default_factory=dict, description="client name -> model id")


class PreviewArgs(_Strict):
    """Previews of running jobs on their ``/events`` streams (``serve.jobs.previews``). How they are
    made and how large they are is per model (its ``engine``: ``preview_method``, ``preview_max_side``,
    ``preview_min_steps``)."""

    job_every_steps: int = Field(
        5, ge=0, le=1000, description="a preview of each image of a running job every k steps; 0: none"
    )


class AppArgs(_Strict):
    models: list[ModelDeployment] = Field(min_length=1)
    ingress: IngressDeployment = IngressDeployment()
    storage: StorageArgs = StorageArgs()
    fetch: FetchArgs = FetchArgs()
    webhooks: WebhookArgs = WebhookArgs()
    cors: CorsPolicy = CorsPolicy()
    openai: OpenAIArgs = OpenAIArgs()
    previews: PreviewArgs = PreviewArgs()
    control_plane: ControlPlaneArgs = ControlPlaneArgs()
    tenants: list[Tenant] = Field(default_factory=list, description="tenants with hashed keys and limits")
    request_timeout_s: float = Field(300, gt=0, description="a request waiting longer gets 504")
    max_side: int = Field(
        MAX_OUTPUT_SIDE,
        ge=64,
        le=MAX_OUTPUT_SIDE,
        description="longest output side for every model (a model's own max_side may lower it further)",
    )

    @model_validator(mode="after")
    def _unique_models(self) -> AppArgs:
        ids = self.registry().ids  # raises on duplicate ids
        for alias, target in self.openai.model_aliases.items():
            if target not in ids:
                raise ValueError(
                    f"openai.model_aliases: {alias!r} -> {target!r}, which is not a configured model; "
                    f"configured: {', '.join(ids)}"
                )
            if alias in ids:
                raise ValueError(
                    f"openai.model_aliases: {alias!r} is already a model id; an alias must differ"
                )
        return self

    def registry(self) -> ModelRegistry:
        return ModelRegistry.from_config([m.spec for m in self.models])


class Secrets(BaseSettings):
    """Per-environment secrets and endpoints, read from ``IMG2IMG_*`` environment variables at start-up."""

    model_config = SettingsConfigDict(env_prefix="IMG2IMG_", extra="ignore", hide_input_in_errors=True)

    dev_api_key: SecretStr | None = Field(None, description="one key for the 'dev' tenant (local runs)")
    api_keys: dict[str, str] = Field(default_factory=dict, repr=False, description="JSON {key: tenant}")
    url_signing_key: SecretStr | None = Field(None, description="HMAC key for local-store URLs")
    webhook_secret: SecretStr | None = Field(
        None,
        description=(
            "server key: a tenant without its own webhook secret signs with HMAC(this, tenant name); "
            "used as one shared secret only with webhooks.shared_secret: true"
        ),
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://[:password@]host:port/db, for control_plane.kind redis"
    )
    s3_endpoint: str | None = None
    s3_public_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = True
    s3_region: str = "us-east-1"

    @field_validator("dev_api_key", "url_signing_key", "webhook_secret", "s3_secret_key")
    @classmethod
    def _no_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        plain = value.get_secret_value().strip() if value is not None else None
        if plain is not None and (plain.lower() in PLACEHOLDERS or len(plain) < 8):
            raise ValueError("is a placeholder or shorter than 8 characters: set a real secret")
        return value

    @field_validator("dev_api_key")
    @classmethod
    def _strong_dev_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            check_api_key(value.get_secret_value(), "dev")
        return value

    @field_validator("api_keys")
    @classmethod
    def _strong_keys_for_valid_tenants(cls, keys: dict[str, str]) -> dict[str, str]:
        """IMG2IMG_API_KEYS is JSON ``{key: tenant}``: every tenant a valid name, every key strong."""
        for key, tenant in keys.items():
            check_tenant_name(tenant)
            check_api_key(key, tenant)
        return keys

    def keys(self, required: bool = True) -> dict[str, str]:
        keys = dict(self.api_keys)
        if self.dev_api_key:
            keys[self.dev_api_key.get_secret_value()] = "dev"
        if not keys and required:
            raise ValueError(
                "no API keys configured: set IMG2IMG_DEV_API_KEY, or IMG2IMG_API_KEYS to JSON {key: tenant}"
            )
        return keys


def configured_tenants(parsed: AppArgs, secrets: Secrets) -> TenantDirectory:
    """Tenants from the Serve config plus keys from the environment (store tenants are added live)."""
    return TenantDirectory.from_plain_keys(secrets.keys(required=not parsed.tenants), base=parsed.tenants)


def build_store(args: AppArgs, secrets: Secrets):
    storage = args.storage
    if storage.kind == "s3":
        missing = [n for n in ("s3_endpoint", "s3_access_key", "s3_secret_key") if not getattr(secrets, n)]
        if missing:
            raise ValueError(
                f"storage.kind is s3 but {', '.join('IMG2IMG_' + m.upper() for m in missing)} unset"
            )
        return S3ObjectStore(
            secrets.s3_endpoint,
            secrets.s3_access_key,
            secrets.s3_secret_key.get_secret_value(),
            storage.bucket,
            secure=secrets.s3_secure,
            region=secrets.s3_region,
            public_endpoint=secrets.s3_public_endpoint,
        )
    if not secrets.url_signing_key:
        raise ValueError("storage.kind is local: set IMG2IMG_URL_SIGNING_KEY (any random string of 8+ chars)")
    signing_key = secrets.url_signing_key.get_secret_value().encode()
    return LocalObjectStore(storage.local_root, storage.public_base_url, signing_key)
