"""scripts/audit_dependencies.py: the floor comparison and how pip-audit's JSON is read (no network)."""

from __future__ import annotations

import subprocess

import pytest

from scripts import audit_dependencies as audit
from scripts.audit_dependencies import AuditReport, DatabaseUnreachable, Floor

FLOORS = [
    Floor("pillow", "10.3.0", "CVE-2024-28219", "ImageCms overflow"),
    Floor("torch", "2.6.0", "CVE-2025-32434", "torch.load RCE"),
    Floor("python-multipart", "0.0.18", "CVE-2024-53981", "boundary DoS"),
    Floor("aiohttp", "3.10.11", "CVE-2024-52304", "smuggling"),
]


def test_installed_versions_below_a_floor_fail_naming_the_advisory():
    installed = {
        "pillow": ["10.2.0"],
        "torch": ["2.13.0+cpu"],  # a local version label is still compared by its release
        "python-multipart": ["0.0.9"],
    }
    problems = audit.below_floor(installed, FLOORS)
    assert len(problems) == 2
    assert problems[0].startswith("pillow 10.2.0 < 10.3.0: CVE-2024-28219")
    assert problems[1].startswith("python-multipart 0.0.9 < 0.0.18: CVE-2024-53981")


def test_packages_at_or_above_their_floor_or_absent_pass():
    installed = {"pillow": ["10.3.0"], "torch": ["2.6.0"], "python-multipart": ["0.0.20"]}
    check = audit.check_floors(installed, FLOORS)
    assert check.ok
    assert "not installed (skipped): aiohttp" in check.lines


def test_names_compare_by_pep_503_and_unparseable_versions_fail():
    installed = {audit.normalize("Python_Multipart"): ["0.0.17"], "pillow": ["not-a-version"]}
    problems = audit.below_floor(installed, FLOORS)
    assert [p.split()[0] for p in problems] == ["pillow", "python-multipart"]


def test_the_shipped_floor_list_holds_the_reviewed_advisories():
    floors = {f.package: (f.minimum, f.advisory) for f in audit.load_floors()}
    assert floors == {
        "pillow": ("10.3.0", "CVE-2024-28219"),
        "starlette": ("0.40.0", "CVE-2024-47874"),
        "urllib3": ("2.2.2", "CVE-2024-37891"),
        "requests": ("2.32.0", "CVE-2024-35195"),
        "jinja2": ("3.1.6", "CVE-2025-27516"),
        "idna": ("3.7", "CVE-2024-3651"),
        "torch": ("2.6.0", "CVE-2025-32434"),
        "h11": ("0.16.0", "CVE-2025-43859"),
        "python-multipart": ("0.0.18", "CVE-2024-53981"),
        "setuptools": ("78.1.1", "CVE-2025-47273"),
        "certifi": ("2024.7.4", "CVE-2024-39689"),
        "zipp": ("3.19.1", "CVE-2024-5569"),
        "aiohttp": ("3.10.11", "CVE-2024-52304"),
    }
    assert all(f.why for f in audit.load_floors())


# ---------------------------------------------------------------- pip-audit's JSON

VULNERABLE = {
    "dependencies": [
        {"name": "img2img-serve", "skip_reason": "Dependency not found on PyPI and could not be audited"},
        {"name": "pillow", "version": "10.2.0", "vulns": []},
        {
            "name": "jinja2",
            "version": "3.1.5",
            "vulns": [
                {"id": "GHSA-cpwx-vrp4-4pq7", "fix_versions": ["3.1.6"], "aliases": ["CVE-2025-27516"]},
            ],
        },
    ],
    "fixes": [],
}
ALL_SKIPPED = {
    "dependencies": [
        {"name": name, "skip_reason": f"Dependency not found on PyPI and could not be audited: {name} (1.0)"}
        for name in ("accelerate", "anyio", "torch")
    ],
    "fixes": [],
}
CLEAN = {"dependencies": [{"name": "pillow", "version": "12.0.0", "vulns": []}], "fixes": []}


def test_a_report_with_a_vulnerability_lists_it_with_its_fix():
    report = audit.interpret_report(VULNERABLE)
    assert report.reached_database and report.audited == 2 and report.skipped == ["img2img-serve"]
    assert report.vulnerable == ["jinja2 3.1.5: GHSA-cpwx-vrp4-4pq7 (CVE-2025-27516); fix: 3.1.6"]
    check = audit.check_online(False, run=lambda service: report)
    assert not check.ok and check.lines[-1] == report.vulnerable[0]


def test_a_report_where_everything_was_skipped_audited_nothing():
    report = audit.interpret_report(ALL_SKIPPED)
    assert not report.reached_database and report.vulnerable == [] and len(report.skipped) == 3
    assert report.skip_reason.startswith("Dependency not found on PyPI")


def test_a_clean_report_passes():
    report = audit.interpret_report(CLEAN)
    assert report == AuditReport(vulnerable=[], audited=1, skipped=[])
    check = audit.check_online(True, run=lambda service: report)
    assert check.ok and check.lines == ["pypi: 1 packages audited", "no known vulnerabilities"]


def _offline(service: str) -> AuditReport:
    if service == "pypi":
        return audit.interpret_report(ALL_SKIPPED)
    raise DatabaseUnreachable("ConnectionError: Failed to resolve the OSV host")


@pytest.mark.parametrize("required", [False, True])
def test_no_reachable_database_is_one_loud_line_and_fails_only_when_required(required):
    check = audit.check_online(required, run=_offline)
    assert check.ok is not required and len(check.lines) == 1
    line = check.lines[0]
    assert line.startswith("!!! ONLINE VULNERABILITY AUDIT DID NOT RUN")
    assert "pypi: all 3 packages skipped" in line and "osv: ConnectionError" in line


def test_the_second_service_decides_when_the_first_cannot_audit():
    reports = {"pypi": audit.interpret_report(ALL_SKIPPED), "osv": audit.interpret_report(VULNERABLE)}
    check = audit.check_online(False, run=reports.__getitem__)
    assert not check.ok and check.lines[0] == "osv: 2 packages audited"


def test_pip_audit_crashing_for_another_reason_fails_the_check():
    def broken(service: str) -> AuditReport:
        raise audit.AuditToolError("pip-audit --vulnerability-service pypi exited 2: bad flag")

    check = audit.check_online(False, run=broken)
    assert not check.ok and "bad flag" in check.lines[0]


@pytest.mark.parametrize(
    ("stdout", "stderr", "outcome"),
    [
        ('{"dependencies": [], "fixes": []}', "", AuditReport),
        (
            "",
            "requests.exceptions.ConnectionError: Max retries exceeded with url: /v1/query",
            DatabaseUnreachable,
        ),
        ("", "error: argument -f/--format: invalid choice", audit.AuditToolError),
        (None, "", DatabaseUnreachable),  # no answer before the deadline
    ],
    ids=["json report", "connection error", "other crash", "timeout"],
)
def test_pip_audit_runs_are_told_apart_by_their_output(monkeypatch, stdout, stderr, outcome):
    def fake_run(command, **kwargs):
        assert "--local" in command and kwargs["timeout"] == audit.SERVICE_TIMEOUT_S
        if stdout is None:
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return subprocess.CompletedProcess(command, 1, stdout, stderr)

    monkeypatch.setattr(audit.subprocess, "run", fake_run)
    if outcome is AuditReport:
        assert isinstance(audit.run_pip_audit("osv"), AuditReport)
    else:
        with pytest.raises(outcome):
            audit.run_pip_audit("osv")
