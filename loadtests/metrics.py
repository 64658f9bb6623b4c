"""Scrape Ray's Prometheus exporter (text format) and reduce each scrape to the figures the report needs."""

from __future__ import annotations

import math
import re
import time
import urllib.request
from dataclasses import dataclass, field

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

BATCHED_SAMPLES = "ray_img2img_batched_samples_total"
UNET_CALLS = "ray_img2img_unet_calls_total"
BATCH_BUCKETS = "ray_img2img_batch_samples_bucket"
INFLIGHT = "ray_img2img_inflight_requests"
REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
REPLICA_PROCESSING = "ray_serve_replica_processing_queries"
TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"
ONGOING_AT_REPLICAS = "ray_serve_num_ongoing_requests_at_replicas"
QUEUED = "ray_serve_deployment_queued_queries"


def normalize_metrics_url(url: str) -> str:
    """``127.0.0.1:8080`` → ``http://127.0.0.1:8080/metrics``; full URLs are kept."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url = f"{scheme}://{rest}/metrics"
    return url


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(4))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match.group(3) or ""))
        samples.append((match.group(1), labels, value))
    return samples


@dataclass
class Snapshot:
    """One scrape, reduced: counters summed over replicas, gauges per deployment."""

    t: float
    batched_samples: float = 0.0
    unet_calls: float = 0.0
    batch_buckets: dict[float, float] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    target_replicas: dict[str, float] = field(default_factory=dict)
    ongoing: dict[str, float] = field(default_factory=dict)
    queued: float = 0.0
    inflight: float = 0.0


def reduce(samples: list[tuple[str, dict[str, str], float]], t: float) -> Snapshot:
    snap = Snapshot(t=t)
    healthy: dict[str, set[str]] = {}
    processing: dict[str, set[str]] = {}
    for name, labels, value in samples:
        deployment = labels.get("deployment", "?")
        if name == BATCHED_SAMPLES:
            snap.batched_samples += value
        elif name == UNET_CALLS:
            snap.unet_calls += value
        elif name == BATCH_BUCKETS:
            le = math.inf if labels.get("le") == "+Inf" else float(labels.get("le", "nan"))
            snap.batch_buckets[le] = snap.batch_buckets.get(le, 0.0) + value
        elif name == INFLIGHT:
            snap.inflight += value
        elif name == REPLICA_HEALTHY and value >= 1:
            healthy.setdefault(deployment, set()).add(labels.get("replica", ""))
        elif name == REPLICA_PROCESSING:
            processing.setdefault(deployment, set()).add(labels.get("replica", ""))
        elif name == TARGET_REPLICAS:
            snap.target_replicas[deployment] = value
        elif name == ONGOING_AT_REPLICAS:
            snap.ongoing[deployment] = snap.ongoing.get(deployment, 0.0) + value
        elif name == QUEUED:
            snap.queued += value
    # Healthy replicas where Ray reports them, else the replicas that report processing queries.
    for deployment in sorted(set(healthy) | set(processing)):
        snap.replicas[deployment] = len(healthy.get(deployment) or processing.get(deployment) or ())
    return snap


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot | None:
    """One bounded scrape; ``None`` when the exporter does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read(64 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    return reduce(parse_prometheus(text), time.time())


def batch_size(before: Snapshot, after: Snapshot) -> float | None:
    """Mean samples per UNet call between two scrapes (``None`` when there was no call)."""
    calls = after.unet_calls - before.unet_calls
    if calls <= 0:
        return None
    return (after.batched_samples - before.batched_samples) / calls


def bucket_counts(before: Snapshot | None, after: Snapshot) -> list[tuple[str, float]]:
    """Histogram bucket deltas turned into per-bucket counts: ``[("1", n), ("2", n), ("3-4", n), ...]``."""
    edges = sorted(after.batch_buckets)
    rows, previous_cumulative, previous_edge = [], 0.0, 0.0
    for edge in edges:
        cumulative = after.batch_buckets[edge] - (before.batch_buckets.get(edge, 0.0) if before else 0.0)
        count = max(cumulative - previous_cumulative, 0.0)
        low = math.floor(previous_edge) + 1
        if math.isinf(edge):
            label = f">{previous_edge:g}"
        elif low >= edge:
            label = f"{edge:g}"
        else:
            label = f"{low:g}-{edge:g}"
        rows.append((label, count))
        previous_cumulative, previous_edge = max(cumulative, previous_cumulative), edge
    return rows
