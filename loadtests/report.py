"""The report folder: ``summary.md`` from locust's final JSON and history CSV plus the metric scrapes,
and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.metrics import Snapshot, batch_size, bucket_counts


@dataclass
class Group:
    """Requests merged over locust entries (e.g. one endpoint over all tenants)."""

    requests: int = 0
    failures: int = 0
    total_ms: float = 0.0
    times: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, entry: dict) -> None:
        self.requests += entry["num_requests"]
        self.failures += entry["num_failures"]
        self.total_ms += entry["total_response_time"]
        for ms, count in entry["response_times"].items():
            self.times[int(float(ms))] += count

    def percentile(self, fraction: float) -> float | None:
        total = sum(self.times.values())
        if not total:
            return None
        rank, seen = math.ceil(fraction * total), 0
        for ms in sorted(self.times):
            seen += self.times[ms]
            if seen >= rank:
                return float(ms)
        return float(max(self.times))


def split_name(name: str) -> tuple[str, str]:
    """``"rest_sync [tenant1]"`` → ``("rest_sync", "tenant1")``."""
    if name.endswith("]") and " [" in name:
        endpoint, _, tenant = name[:-1].rpartition(" [")
        return endpoint, tenant
    return name, "-"


def load_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def fmt_number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _stats_rows(groups: dict[str, Group], wall_s: float) -> list[list[str]]:
    rows = []
    for key in sorted(groups):
        group = groups[key]
        rows.append(
            [
                key,
                str(group.requests),
                str(group.failures),
                f"{100 * group.failures / group.requests:.1f}%" if group.requests else "-",
                f"{group.requests / wall_s:.2f}" if wall_s > 0 else "-",
                fmt_number(group.total_ms / group.requests if group.requests else None),
                fmt_number(group.percentile(0.5)),
                fmt_number(group.percentile(0.95)),
                fmt_number(group.percentile(0.99)),
            ]
        )
    return rows


STATS_HEADERS = ["", "requests", "failures", "error rate", "req/s", "mean ms", "p50 ms", "p95 ms", "p99 ms"]


def write_report(
    out: Path,
    *,
    config: dict,
    entries: list[dict],
    history: list[dict],
    snapshots: list[Snapshot],
    failures: list[dict],
    wall_s: float,
) -> Path:
    """Writes ``summary.md`` and the plots into ``out``; returns the summary's path."""
    by_endpoint: dict[str, Group] = defaultdict(Group)
    by_tenant: dict[str, Group] = defaultdict(Group)
    by_name: dict[str, Group] = defaultdict(Group)
    for entry in entries:
        endpoint, tenant = split_name(entry["name"])
        by_endpoint[endpoint].add(entry)
        by_tenant[tenant].add(entry)
        by_name[f"{endpoint} [{tenant}]"].add(entry)
    total = Group()
    for entry in entries:
        if split_name(entry["name"])[0] != "async_e2e":  # a derived figure, not an HTTP request
            total.add(entry)

    lines = [
        "# Load test report",
        "",
        f"Target `{config['url']}`, scenario `{config['scenario']}`, shape `{config['shape']}`, "
        f"{config['users']} users (peak), {config['duration']} s, steps {config['steps']}, "
        f"tenants: {', '.join(config['tenants'])}.",
        "",
        f"**{total.requests} HTTP requests in {wall_s:.0f} s: "
        f"{total.requests / max(wall_s, 1e-9):.2f} req/s, "
        f"{total.failures} failures "
        f"({100 * total.failures / total.requests if total.requests else 0:.1f}%), "
        f"p50 {fmt_number(total.percentile(0.5))} ms, p95 {fmt_number(total.percentile(0.95))} ms, "
        f"p99 {fmt_number(total.percentile(0.99))} ms.**",
        "",
        "`async_e2e` is the end-to-end time of an async job (submit to final state, polls included); it is",
        "not an HTTP request and is left out of the totals.",
        "",
        "## Per endpoint",
        "",
        *markdown_table(["endpoint", *STATS_HEADERS[1:]], _stats_rows(by_endpoint, wall_s)),
        "",
        "## Per tenant (all endpoints, async_e2e included)",
        "",
        *markdown_table(["tenant", *STATS_HEADERS[1:]], _stats_rows(by_tenant, wall_s)),
        "",
        "## Per endpoint and tenant",
        "",
        *markdown_table(["request", *STATS_HEADERS[1:]], _stats_rows(by_name, wall_s)),
        "",
    ]
    if failures:
        lines += ["## Failures", ""]
        rows = [
            [f["Method"], f["Name"], f["Error"][:160].replace("|", "/"), f["Occurrences"]]
            for f in sorted(failures, key=lambda f: -int(f.get("Occurrences") or 0))[:20]
        ]
        lines += [*markdown_table(["method", "name", "error", "count"], rows), ""]

    lines += metrics_section(config, snapshots)
    plots = _plots(out, history, snapshots)
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary


def metrics_section(config: dict, snapshots: list[Snapshot]) -> list[str]:
    lines = ["## Server metrics", ""]
    if not config.get("metrics_url"):
        return [*lines, "No `--metrics-url` given: no batch sizes or replica counts.", ""]
    if len(snapshots) < 2:
        return [*lines, f"Fewer than two scrapes of `{config['metrics_url']}` succeeded.", ""]
    first, last = snapshots[0], snapshots[-1]
    calls = last.unet_calls - first.unet_calls
    samples = last.batched_samples - first.batched_samples
    lines += [
        f"{len(snapshots)} scrapes of `{config['metrics_url']}` every ~{config['scrape_interval']} s.",
        "",
        f"* UNet calls: {calls:.0f}, samples in them: {samples:.0f}, **mean batch size "
        f"{samples / calls if calls > 0 else float('nan'):.2f}** "
        "(delta `ray_img2img_batched_samples_total` / delta `ray_img2img_unet_calls_total`).",
    ]
    sizes = [s for s in (batch_size(a, b) for a, b in itertools.pairwise(snapshots)) if s]
    if sizes:
        lines.append(f"* Batch size per scrape interval: min {min(sizes):.2f}, max {max(sizes):.2f}.")
    peak_inflight = max(s.inflight for s in snapshots)
    lines += [
        f"* Peak in-flight requests at model replicas (`ray_img2img_inflight_requests`): {peak_inflight:.0f}."
    ]
    buckets = bucket_counts(first, last)
    if buckets and sum(c for _, c in buckets):
        total = sum(c for _, c in buckets)
        lines += ["", "Batch size distribution (`ray_img2img_batch_samples` bucket deltas, UNet calls):", ""]
        rows = [[label, f"{count:.0f}", f"{100 * count / total:.1f}%"] for label, count in buckets if count]
        lines += markdown_table(["samples per call", "calls", "share"], rows)
    lines += ["", "Replicas per deployment over time (healthy replicas; changes only):", ""]
    deployments = sorted({d for s in snapshots for d in s.replicas})
    rows, previous = [], None
    for snap in snapshots:
        current = [str(snap.replicas.get(d, 0)) for d in deployments]
        if current != previous:
            rows.append([f"{snap.t - first.t:.0f}", *current])
            previous = current
    lines += [*markdown_table(["t (s)", *deployments], rows), ""]
    ongoing = sorted({d for s in snapshots for d in s.ongoing})
    if ongoing:
        peaks = ", ".join(f"{d} {max(s.ongoing.get(d, 0) for s in snapshots):.0f}" for d in ongoing)
        lines += [f"Peak ongoing requests (`ray_serve_num_ongoing_requests_at_replicas`): {peaks}.", ""]
    return lines


def _plots(out: Path, history: list[dict], snapshots: list[Snapshot]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    aggregated = [row for row in history if row.get("Name") == "Aggregated" and _num(row.get("User Count"))]
    if aggregated:
        t0 = float(aggregated[0]["Timestamp"])
        times = [float(r["Timestamp"]) - t0 for r in aggregated]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for column, label in (("50%", "p50"), ("95%", "p95"), ("99%", "p99")):
            ax.plot(times, [_num(r[column]) for r in aggregated], label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("latency (ms), all names")
        ax.set_title("Latency percentiles, async_e2e included (locust's sliding window)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=80)
        plt.close(fig)
        written.append("latency.png")

        per_endpoint: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for row in history:
            if row.get("Name") in (None, "Aggregated"):
                continue
            endpoint = split_name(row["Name"])[0]
            per_endpoint[endpoint][float(row["Timestamp"]) - t0] += _num(row["Requests/s"]) or 0.0
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(times, [_num(r["Requests/s"]) for r in aggregated], label="all", color="black")
        for endpoint in sorted(per_endpoint):
            points = sorted(per_endpoint[endpoint].items())
            ax.plot([p[0] for p in points], [p[1] for p in points], label=endpoint, alpha=0.8)
        users = ax.twinx()
        users.step(times, [_num(r["User Count"]) for r in aggregated], color="grey", alpha=0.4, where="post")
        users.set_ylabel("users", color="grey")
        users.set_ylim(0, max((_num(r["User Count"]) or 0) for r in aggregated) * 1.15 + 1)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("requests/s")
        ax.set_ylim(bottom=0)
        ax.set_title("Throughput (users shaded)")
        ax.legend(fontsize="small", loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=80)
        plt.close(fig)
        written.append("throughput.png")

    if len(snapshots) >= 2:
        t0 = snapshots[0].t
        pairs = list(itertools.pairwise(snapshots))
        fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
        points = [(b.t - t0, batch_size(a, b)) for a, b in pairs]
        left.plot([p[0] for p in points], [p[1] for p in points], marker=".")
        left.set_xlabel("time (s)")
        left.set_ylabel("samples per UNet call")
        left.set_ylim(bottom=0)
        left.set_title("Mean batch size per scrape interval")
        left.grid(alpha=0.3)
        buckets = [(label, count) for label, count in bucket_counts(snapshots[0], snapshots[-1]) if count]
        right.bar([b[0] for b in buckets], [b[1] for b in buckets])
        right.set_xlabel("samples per UNet call")
        right.set_ylabel("UNet calls")
        right.set_title("Batch size distribution")
        fig.tight_layout()
        fig.savefig(out / "batching.png", dpi=80)
        plt.close(fig)
        written.append("batching.png")

        fig, ax = plt.subplots(figsize=(7, 3.5))
        for deployment in sorted({d for s in snapshots for d in s.replicas}):
            ax.step(
                [s.t - t0 for s in snapshots],
                [s.replicas.get(deployment, 0) for s in snapshots],
                where="post",
                label=f"{deployment} replicas",
            )
        ax.plot(
            [s.t - t0 for s in snapshots], [s.inflight for s in snapshots], "k--", label="in-flight (model)"
        )
        ax.set_xlabel("time (s)")
        ax.set_title("Replicas and in-flight requests")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "replicas.png", dpi=80)
        plt.close(fig)
        written.append("replicas.png")
    return written


def load_entries(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def load_failures(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
