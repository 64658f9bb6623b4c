"""Dependency audit for CI (``make audit``; ``make test`` runs it before pytest).

    python scripts/audit_dependencies.py                         # exit 1 if a check fails
    AUDIT_REQUIRE_ONLINE=1 python scripts/audit_dependencies.py  # also fail if no database answers

Three checks of the environment this interpreter runs in, in order:

1. ``pip check``: a requirement that is missing or out of its range fails.
2. Security floors (``scripts/security_floors.toml``): an installed package below the minimum safe
   version of a known advisory fails. Offline on purpose: it works where nothing else can.
3. ``pip-audit`` against PyPI's vulnerability data, then OSV: any vulnerability found fails. Where
   neither database is reachable (PyPI's JSON API answers "not found" for every package, so
   pip-audit skips them all; OSV fails with a connection error) the audit says so in one loud line
   and passes, unless ``AUDIT_REQUIRE_ONLINE=1``: an audit that silently audited nothing must never
   read as "no known vulnerabilities".
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

FLOORS_FILE = Path(__file__).with_name("security_floors.toml")
SERVICES = ("pypi", "osv")  # pip-audit's vulnerability services, tried in this order
SERVICE_TIMEOUT_S = 25  # per service; the whole audit stays under a minute when nothing answers
SOCKET_TIMEOUT_S = 8
PIP_CHECK_TIMEOUT_S = 60
_UNREACHABLE = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|NameResolution|Max retries exceeded|"
    r"Temporary failure in name resolution|Network is unreachable|timed out",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``ok`` decides the exit status, ``lines`` say why."""

    name: str
    ok: bool
    lines: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- 1. pip check


def check_pip() -> Check:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"],
        capture_output=True,
        text=True,
        timeout=PIP_CHECK_TIMEOUT_S,
    )
    output = (result.stdout + result.stderr).strip().splitlines()
    if result.returncode != 0:
        return Check("pip check", False, ["broken requirements:", *output])
    return Check("pip check", True, output or ["no broken requirements"])


# ---------------------------------------------------------------- 2. security floors


@dataclass(frozen=True)
class Floor:
    package: str
    minimum: str
    advisory: str
    why: str


def normalize(name: str) -> str:
    """PEP 503 name: ``Python_Multipart`` and ``python-multipart`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def load_floors(path: Path = FLOORS_FILE) -> list[Floor]:
    with path.open("rb") as handle:
        entries = tomllib.load(handle).get("floor", [])
    floors = [Floor(**entry) for entry in entries]
    for floor in floors:
        Version(floor.minimum)  # a typo in the file fails here, naming the version
    return floors


def installed_versions() -> dict[str, list[str]]:
    """Every installed distribution's versions by normalized name (a broken venv can hold two)."""
    versions: dict[str, list[str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalize(name), []).append(dist.version)
    return versions


def below_floor(installed: Mapping[str, Iterable[str]], floors: Iterable[Floor]) -> list[str]:
    """One line per installed version under a floor (unparseable versions count as under)."""
    problems = []
    for floor in floors:
        for version in installed.get(normalize(floor.package), ()):
            try:
                safe = Version(version) >= Version(floor.minimum)
            except InvalidVersion:
                safe = False
            if not safe:
                problems.append(
                    f"{floor.package} {version} < {floor.minimum}: {floor.advisory} ({floor.why})"
                )
    return problems


def check_floors(installed: Mapping[str, Iterable[str]], floors: list[Floor]) -> Check:
    problems = below_floor(installed, floors)
    if problems:
        return Check("security floors", False, ["installed below a security floor (upgrade):", *problems])
    present = sorted({normalize(f.package) for f in floors} & set(installed))
    absent = sorted({normalize(f.package) for f in floors} - set(installed))
    lines = [f"{len(floors)} floors; installed and at or above: {', '.join(present) or 'none'}"]
    if absent:
        lines.append(f"not installed (skipped): {', '.join(absent)}")
    return Check("security floors", True, lines)


# ---------------------------------------------------------------- 3. pip-audit


class DatabaseUnreachable(Exception):
    """The vulnerability service could not be asked (network, DNS, timeout)."""


class AuditToolError(Exception):
    """pip-audit failed for a reason other than the network: a real failure of the check."""


@dataclass(frozen=True)
class AuditReport:
    """What one pip-audit JSON report says."""

    vulnerable: list[str]
    audited: int
    skipped: list[str]
    skip_reason: str | None = None

    @property
    def reached_database(self) -> bool:
        return self.audited > 0


def interpret_report(report: Mapping) -> AuditReport:
    """Read ``pip-audit --format json``: vulnerabilities, and how many packages were really audited."""
    vulnerable, skipped, reasons, audited = [], [], [], 0
    for dep in report.get("dependencies", []):
        if "skip_reason" in dep:
            skipped.append(dep["name"])
            reasons.append(dep["skip_reason"])
            continue
        audited += 1
        for vuln in dep.get("vulns", []):
            fixes = ", ".join(vuln.get("fix_versions") or []) or "no fixed version yet"
            aliases = ", ".join(a for a in vuln.get("aliases") or [] if a != vuln["id"])
            known_as = f" ({aliases})" if aliases else ""
            vulnerable.append(
                f"{dep['name']} {dep.get('version', '?')}: {vuln['id']}{known_as}; fix: {fixes}"
            )
    return AuditReport(vulnerable, audited, skipped, reasons[0] if reasons else None)


def run_pip_audit(service: str) -> AuditReport:
    """pip-audit on this environment with one service; DatabaseUnreachable when it cannot be asked."""
    command = [sys.executable, "-m", "pip_audit", "--local", "--format", "json"]
    command += [
        "--progress-spinner",
        "off",
        "--timeout",
        str(SOCKET_TIMEOUT_S),
        "--vulnerability-service",
        service,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=SERVICE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DatabaseUnreachable(f"no answer within {SERVICE_TIMEOUT_S} s") from None
    try:  # exit 1 with a JSON report means "vulnerabilities found"
        return interpret_report(json.loads(result.stdout))
    except json.JSONDecodeError:
        pass
    last = next((line for line in reversed(result.stderr.strip().splitlines()) if line.strip()), "")
    if _UNREACHABLE.search(result.stderr):
        raise DatabaseUnreachable(last.strip()[:300])
    raise AuditToolError(f"pip-audit --vulnerability-service {service} exited {result.returncode}: {last}")


def check_online(
    require_online: bool, run: Callable[[str], AuditReport] = run_pip_audit, services=SERVICES
) -> Check:
    """The first service that really audits decides; if none can, say so loudly (and fail if required)."""
    reasons = []
    for service in services:
        try:
            report = run(service)
        except DatabaseUnreachable as error:
            reasons.append(f"{service}: {error}")
            continue
        except AuditToolError as error:
            return Check("pip-audit", False, [str(error)])
        if not report.reached_database:
            reasons.append(f"{service}: all {len(report.skipped)} packages skipped ({report.skip_reason})")
            continue
        lines = [f"{service}: {report.audited} packages audited"]
        if report.skipped:
            lines.append(f"not audited (not on the index): {', '.join(report.skipped)}")
        if report.vulnerable:
            return Check("pip-audit", False, [*lines, "known vulnerabilities:", *report.vulnerable])
        return Check("pip-audit", True, [*lines, "no known vulnerabilities"])
    loud = (
        "!!! ONLINE VULNERABILITY AUDIT DID NOT RUN: no vulnerability database was reachable "
        f"({'; '.join(reasons)}). Only pip check and the offline floors were checked."
    )
    hint = (
        "AUDIT_REQUIRE_ONLINE=1: failing."
        if require_online
        else "Set AUDIT_REQUIRE_ONLINE=1 to fail on this."
    )
    return Check("pip-audit", not require_online, [f"{loud} {hint}"])


# ---------------------------------------------------------------- main


def main() -> int:
    require_online = os.environ.get("AUDIT_REQUIRE_ONLINE", "") == "1"
    checks = [
        check_pip(),
        check_floors(installed_versions(), load_floors()),
        check_online(require_online),
    ]
    for check in checks:
        print(f"audit: {check.name}: {'ok' if check.ok else 'FAILED'}")
        for line in check.lines:
            print(f"    {line}")
    failed = [check.name for check in checks if not check.ok]
    print(f"audit: {'FAILED: ' + ', '.join(failed) if failed else 'passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
