"""Every metric the service exports, defined once.

They are ``ray.serve.metrics`` objects, so they reach Prometheus through Ray's exporter (which
prefixes ``ray_``; counters also get ``_total``). A plain prometheus_client metric inside a replica
would not be exported. Labels are bounded: routes are path templates, models come from config,
statuses are HTTP codes. Ray is imported lazily so the FastAPI app stays Ray-free in unit tests.
"""

from __future__ import annotations

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300]
STEP_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


class IngressMetrics:
    """Request counts and end-to-end latency, recorded by the ingress for every API route."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter(
            "img2img_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self.latency = Histogram(
            "img2img_request_latency_seconds",
            description="End-to-end request latency at the ingress",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route",),
        )

    def request_done(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})


class WorkerMetrics:
    """What the batching engine does: queue wait, step time, real batch size, images, load."""

    def __init__(self, model_id: str) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        tags = {"model": model_id}
        self.queue_wait = Histogram(
            "img2img_queue_wait_seconds",
            description="Time from enqueue at the replica to admission into the batch",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("model",),
        )
        self.step_time = Histogram(
            "img2img_denoise_step_seconds",
            description="Wall time of one batched denoising step (UNet call, guidance, scheduler, decode)",
            boundaries=STEP_BUCKETS_S,
            tag_keys=("model",),
        )
        self.batch_samples = Histogram(
            "img2img_batch_samples",
            description="Samples sharing one UNet call (the real batch size)",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model",),
        )
        self.images = Counter("img2img_images_generated", description="Images generated", tag_keys=("model",))
        # Exact batch-size accounting: Ray rebuilds a histogram's _sum from bucket midpoints, so the mean
        # batch size is rate(..._batched_samples_total) / rate(..._unet_calls_total), not _sum/_count.
        self.unet_calls = Counter("img2img_unet_calls", description="Batched UNet calls", tag_keys=("model",))
        self.batched_samples = Counter(
            "img2img_batched_samples", description="Samples summed over UNet calls", tag_keys=("model",)
        )
        self.failures = Counter(
            "img2img_generation_failures",
            description="Requests that failed in the engine",
            tag_keys=("model",),
        )
        self.inflight = Gauge(
            "img2img_inflight_requests",
            description="Requests queued or running in the replica",
            tag_keys=("model",),
        )
        self.oom_splits = Counter(
            "img2img_oom_splits",
            description="UNet calls split in halves after an accelerator out-of-memory error",
            tag_keys=("model",),
        )
        self.previews = Counter(
            "img2img_previews", description="Previews of images in progress rendered", tag_keys=("model",)
        )
        self.preview_seconds = Counter(
            "img2img_preview_seconds",
            description="Engine time spent rendering previews (inside step time: their cost to the batch)",
            tag_keys=("model",),
        )
        self.padded_rows = Counter(
            "img2img_padded_rows",
            description="UNet rows added to reach a row bucket (work spent on fixed shapes)",
            tag_keys=("model",),
        )
        self.effective_cap = Gauge(
            "img2img_effective_batch_cap",
            description="Samples one UNet call of a latent-size bucket may take now (lowered after an OOM)",
            tag_keys=("model", "bucket"),
        )
        self._lowered: set[str] = set()
        for metric in (
            self.queue_wait,
            self.step_time,
            self.batch_samples,
            self.images,
            self.failures,
            self.inflight,
            self.unet_calls,
            self.batched_samples,
            self.oom_splits,
            self.padded_rows,
            self.previews,
            self.preview_seconds,
            self.effective_cap,
        ):
            metric.set_default_tags(dict(tags))  # Ray adds its own keys to the dict it is given

    def step(self, stats, configured_cap: int, lowered: dict[tuple[int, int], int]) -> None:
        """One engine step's ``StepStats``; ``lowered`` maps buckets to caps an OOM lowered."""
        self.batch_samples.observe(stats.samples)
        self.unet_calls.inc(max(stats.unet_calls, 1))
        self.batched_samples.inc(stats.samples)
        self.step_time.observe(stats.step_s)
        if stats.oom_splits:
            self.oom_splits.inc(stats.oom_splits)
        if stats.padded_rows:
            self.padded_rows.inc(stats.padded_rows)
        if stats.previews:
            self.previews.inc(stats.previews)
            self.preview_seconds.inc(stats.preview_s)
        now = {f"{h}x{w}": cap for (h, w), cap in lowered.items()}
        for bucket in self._lowered - set(now):  # cool-down over: back to the configured cap
            self.effective_cap.set(configured_cap, tags={"bucket": bucket})
        for bucket, cap in now.items():
            self.effective_cap.set(cap, tags={"bucket": bucket})
        self._lowered = set(now)

    def finished(self, images: int, queue_wait_s: float) -> None:
        self.images.inc(images)
        self.queue_wait.observe(queue_wait_s)

    def failed(self) -> None:
        self.failures.inc()

    def set_inflight(self, count: int) -> None:
        self.inflight.set(count)


class TenantMetrics:
    """Per-tenant usage counters; the tenant label is bounded by the configured tenants."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter

        self.counters = {
            name: Counter(f"img2img_tenant_{name}", description=f"{name} per tenant", tag_keys=("tenant",))
            for name in ("requests", "images", "steps", "compute_seconds")
        }

    def tenant_usage(self, tenant: str, usage: dict[str, float]) -> None:
        for name, counter in self.counters.items():
            if usage.get(name):
                counter.inc(float(usage[name]), tags={"tenant": tenant})
