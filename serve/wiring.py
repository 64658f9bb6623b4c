"""``wire``: one process's service (store, tenants, generation service) from validated args.

Every process that serves calls (the ingress replicas and the job coordinator) is built by this one
function, so they cannot drift apart. It takes ``AppArgs`` already validated (``serve.app.build_app``
validates once, in the driver; replicas receive the object) and reads only the secrets, which belong
to the process's environment. The Ray-specific parts (model backend, admission client) are passed
in: this module needs no Ray, and tests wire a process with fakes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.images import ImageLimits
from serve.config import AppArgs, Secrets, build_store, configured_tenants
from serve.generation.service import Admission, GenerationService, ModelBackend
from serve.jobs.records import JobStore
from serve.outbound.fetch import FetchPolicy
from serve.storage.objects import ObjectStore
from serve.tenancy.tenants import TenantCatalog, TenantStore


@dataclass
class Wired:
    """What a serving process shares between its parts."""

    store: ObjectStore
    tenants: TenantCatalog
    service: GenerationService
    records: JobStore


def wire(args: AppArgs, secrets: Secrets, backend: ModelBackend, admission: Admission | None = None) -> Wired:
    store = build_store(args, secrets)
    tenants = TenantCatalog(configured_tenants(args, secrets), TenantStore(store))
    service = GenerationService(
        registry=args.registry(),
        backend=backend,
        store=store,
        fetch_policy=FetchPolicy(
            allow_networks=args.fetch.allow_networks,
            total_timeout_s=args.fetch.timeout_s,
            allow_plain_http_webhooks=args.webhooks.allow_plain_http,
        ),
        image_limits=ImageLimits(),
        url_expiry_s=args.storage.url_expiry_s,
        max_side=args.max_side,
        admission=admission,
        tenant_lookup=tenants.lookup,
    )
    return Wired(store, tenants, service, JobStore(store))
