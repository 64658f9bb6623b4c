"""The soak's verdict and its report: ``soak.json`` (everything, for tools) and ``soak.md`` (for people),
plus ``memory.png`` (RSS over time per process).

Kept apart from the runner so that the figures (counts, percentiles, growth, verdict) are plain
functions of the recorded outcomes and samples, testable without Ray or a network.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from loadtests._shared import percentile
from loadtests.growth import Growth
from loadtests.metrics import Snapshot
from loadtests.report import fmt_number, markdown_table, metrics_section
from loadtests.schedule import ScheduleHealth
from loadtests.workers import MemorySample

EXIT_ERRORS = 1
EXIT_BEHIND = 2
EXIT_GROWTH = 4  # only with --fail-on-growth
EXIT_NO_SERVICE = 8
SHORT_WINDOW_S = 240  # below this the steady window is too short for a meaningful slope


@dataclass(frozen=True)
class Outcome:
    """One request: when it was due and sent (seconds from the start), how long it took, what failed."""

    endpoint: str
    due_s: float
    sent_s: float
    latency_s: float | None  # None when it never finished (cut off at the end of the drain)
    error: str | None
    downloaded: bool = False


def endpoint_stats(outcomes: list[Outcome], load_s: float) -> dict[str, dict]:
    """Per endpoint (and ``all``): sent, ok, errors by code, images downloaded, rate, latency percentiles
    of the successful requests (an async job's latency is submit → completed, polls included)."""
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome.endpoint].append(outcome)
        groups["all"].append(outcome)
    stats = {}
    for endpoint in sorted(groups, key=lambda e: (e == "all", e)):
        group = groups[endpoint]
        latencies = [o.latency_s for o in group if o.error is None and o.latency_s is not None]
        errors = Counter(o.error for o in group if o.error is not None)
        stats[endpoint] = {
            "sent": len(group),
            "ok": len(group) - sum(errors.values()),
            "errors": sum(errors.values()),
            "errors_by_code": dict(errors.most_common()),
            "downloads_checked": sum(o.downloaded for o in group),
            "rate_per_s": len(group) / load_s if load_s > 0 else None,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p95_s": percentile(latencies, 95),
            "latency_p99_s": percentile(latencies, 99),
            "latency_max_s": max(latencies, default=None),
        }
    return stats


def exit_code(errors: int, health: ScheduleHealth, growth: list[Growth], fail_on_growth: bool) -> int:
    """Bit flags: 1 = any request failed, 2 = behind the schedule, 4 = memory growth flagged (opt-in)."""
    code = EXIT_ERRORS if errors else 0
    code |= EXIT_BEHIND if health.behind else 0
    code |= EXIT_GROWTH if fail_on_growth and any(g.flagged for g in growth) else 0
    return code


def build_summary(
    *,
    config: dict,
    outcomes: list[Outcome],
    load_s: float,
    wall_s: float,
    health: ScheduleHealth,
    growth: list[Growth],
    memory_note: str,
    snapshots: list[Snapshot],
    exit_status: int,
) -> dict:
    return {
        "config": config,
        "exit_code": exit_status,
        "load_s": load_s,
        "wall_s": wall_s,
        "requests": endpoint_stats(outcomes, load_s),
        "schedule": {**dataclasses.asdict(health), "unsent": health.unsent, "behind": health.behind},
        "memory": {
            "note": memory_note,
            "processes": [{**dataclasses.asdict(g), "growth_mb": g.growth_mb} for g in growth],
        },
        "metrics_snapshots": len(snapshots),
    }


def _verdict(summary: dict) -> str:
    code = summary["exit_code"]
    if code == 0:
        return "PASS"
    reasons = []
    if code & EXIT_ERRORS:
        reasons.append(f"{summary['requests']['all']['errors']} failed requests")
    if code & EXIT_BEHIND:
        reasons.append("fell behind the schedule")
    if code & EXIT_GROWTH:
        reasons.append("memory growth flagged")
    return f"FAIL (exit {code}: {', '.join(reasons)})"


def render_markdown(summary: dict, snapshots: list[Snapshot], plots: list[str] = ()) -> str:
    config, requests, schedule = summary["config"], summary["requests"], summary["schedule"]
    total = requests.get("all", {"sent": 0, "ok": 0, "errors": 0})
    flagged = [p for p in summary["memory"]["processes"] if p["flagged"]]
    lines = [
        "# Soak report",
        "",
        f"Target `{config['target']}` ({config['storage']} storage), {config['arrivals']} arrivals at "
        f"{config['rate']} req/s for {config['duration']} s (cap {config['max_requests']} requests), "
        f"at most {config['concurrency']} in flight, endpoints {', '.join(config['endpoints'])}, "
        f"steps {config['steps']}, sides {config['sides']}, 1-2 images.",
        "",
        f"**{_verdict(summary)}: {total['sent']} requests in {summary['load_s']:.0f} s "
        f"({fmt_number(total.get('rate_per_s'), 2)} req/s), {total['ok']} ok, {total['errors']} errors; "
        f"{summary['wall_s']:.0f} s with the drain; {len(flagged)} process(es) flagged for memory growth.**",
        "",
        "## Requests",
        "",
        "Latency of successful requests; `async` is submit → completed, polls included.",
        "",
    ]
    rows = [
        [
            endpoint,
            str(s["sent"]),
            str(s["ok"]),
            str(s["errors"]),
            str(s["downloads_checked"]),
            fmt_number(s["rate_per_s"], 2),
            fmt_number(s["latency_p50_s"], 2),
            fmt_number(s["latency_p95_s"], 2),
            fmt_number(s["latency_p99_s"], 2),
            fmt_number(s["latency_max_s"], 2),
        ]
        for endpoint, s in requests.items()
    ]
    headers = [
        "endpoint",
        "sent",
        "ok",
        "errors",
        "images checked",
        "req/s",
        "p50 s",
        "p95 s",
        "p99 s",
        "max s",
    ]
    lines += [*markdown_table(headers, rows), "", "## Errors", ""]
    error_rows = [
        [endpoint, code, str(count)]
        for endpoint, s in requests.items()
        if endpoint != "all"
        for code, count in s["errors_by_code"].items()
    ]
    lines += [*(markdown_table(["endpoint", "error", "count"], error_rows) if error_rows else ["None."]), ""]
    lines += [
        "## Schedule",
        "",
        f"{schedule['scheduled']} requests due, {schedule['sent']} sent, {schedule['unsent']} left unsent; "
        f"send lag (time waiting for a free slot) p50 {fmt_number(schedule['lag_p50_s'], 2)} s, "
        f"p95 {fmt_number(schedule['lag_p95_s'], 2)} s, max {fmt_number(schedule['lag_max_s'], 2)} s "
        f"(a request not sent within {schedule['max_lag_s']} s is skipped): "
        f"**{'BEHIND' if schedule['behind'] else 'kept up'}**.",
        "",
        "## Memory per process",
        "",
        summary["memory"]["note"],
        "",
    ]
    processes = summary["memory"]["processes"]
    if processes:
        lines += [
            f"RSS in MB; growth = last - first; slope = least-squares fit over the steady window "
            f"(t ≥ {config['window_start_s']:.0f} s, the first {config['warmup_fraction']:.0%} of the run "
            f"excluded), flagged (⚠) above {config['growth_threshold_mb_h']} MB/h with a fitted rise of "
            f"at least {config['min_rise_mb']} MB.",
            "",
        ]
        rows = [
            [
                p["label"],
                str(p["pid"]),
                f"{p['first_t']:.0f}–{p['last_t']:.0f}",
                str(p["samples"]),
                fmt_number(p["first_mb"], 1),
                fmt_number(p["last_mb"], 1),
                fmt_number(p["max_mb"], 1),
                f"{p['growth_mb']:+.1f}",
                "-" if p["slope_mb_per_h"] is None else f"{p['slope_mb_per_h']:+.1f}",
                fmt_number(p["last_uss_mb"], 1),
                "⚠" if p["flagged"] else "",
            ]
            for p in processes
        ]
        headers = [
            "process",
            "pid",
            "t (s)",
            "samples",
            "first",
            "last",
            "max",
            "growth",
            "MB/h",
            "USS",
            "flag",
        ]
        lines += [*markdown_table(headers, rows), ""]
        window_s = summary["wall_s"] - config["window_start_s"]
        if window_s < SHORT_WINDOW_S:
            lines += [
                f"The steady window is only {window_s:.0f} s: at this length the slopes and flags are "
                "mostly noise (warm-up of new shapes, allocator); judge growth on a 10-minute run.",
                "",
            ]
    lines += metrics_section(config, snapshots)
    lines += [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def plot_memory(out: Path, samples: list[MemorySample]) -> list[str]:
    """``memory.png``: RSS over time, one line per process (the ten largest by peak, for legibility)."""
    if not samples:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[MemorySample]] = defaultdict(list)
    for sample in samples:
        series[sample.key].append(sample)
    largest = sorted(series, key=lambda key: -max(s.rss_mb for s in series[key]))[:10]
    fig, ax = plt.subplots(figsize=(8, 4))
    for key in largest:
        points = sorted(series[key], key=lambda s: s.t)
        ax.plot([s.t for s in points], [s.rss_mb for s in points], marker=".", label=key)
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title("Memory per process")
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=80)
    plt.close(fig)
    return ["memory.png"]


def write_report(
    out: Path, summary: dict, samples: list[MemorySample], snapshots: list[Snapshot]
) -> tuple[Path, str]:
    """``soak.json`` (summary, samples and scrapes), ``memory.png`` and ``soak.md``; returns the
    Markdown's path and text."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **summary,
        "memory_samples": [dataclasses.asdict(s) for s in samples],
        "metrics": [dataclasses.asdict(s) for s in snapshots],
    }
    (out / "soak.json").write_text(json.dumps(payload, indent=1, default=str))
    markdown = render_markdown(summary, snapshots, plot_memory(out, samples))
    path = out / "soak.md"
    path.write_text(markdown)
    return path, markdown
