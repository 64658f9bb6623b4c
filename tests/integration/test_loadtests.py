"""`python -m loadtests` against the integration stack: a short mixed run that must write a full report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ENDPOINTS = ("rest_sync", "node", "async_submit", "async_poll", "async_e2e", "openai_edits")


def _row(summary: str, name: str) -> list[str]:
    match = re.search(rf"^\| {re.escape(name)} \|(.*)\|$", summary, re.MULTILINE)
    assert match, f"no row for {name!r} in summary.md"
    return [cell.strip() for cell in match.group(1).split("|")]


def test_mixed_constant_run_writes_report(stack, tmp_path: Path):
    out = tmp_path / "report"
    command = [
        sys.executable,
        "-m",
        "loadtests",
        "--url",
        stack.base_url,
        "--api-keys",
        f"tenant-a={stack.api_key},tenant-b=integration-key-b-12345",
        "--scenario",
        "mixed",
        "--shape",
        "constant",
        "--users",
        "4",
        "--duration",
        "20",
        "--steps",
        "2-3",
        "--metrics-url",
        stack.metrics_url,
        "--scrape-interval",
        "2",
        "--stop-timeout",
        "20",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"users\s+\d+\s+requests\s+\d+", result.stdout), result.stdout  # progress lines

    summary = (out / "summary.md").read_text()
    for plot in ("latency.png", "throughput.png", "batching.png", "replicas.png"):
        assert (out / plot).stat().st_size > 1000, plot
        assert f"({plot})" in summary
    for endpoint in ENDPOINTS:
        requests, failures, _, rps, *_ = _row(summary, endpoint)
        assert int(requests) > 0, endpoint
        assert float(rps) > 0, endpoint
    requests, failures, *_ = _row(summary, "rest_sync")
    assert failures == "0", summary
    for tenant in ("tenant-a", "tenant-b"):
        assert f"| {tenant} |" in summary
    assert "mean batch size" in summary
    assert "model-tiny-sd" in summary  # replicas per deployment
