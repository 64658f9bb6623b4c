"""The import contracts in pyproject.toml ([tool.importlinter], checked by `lint-imports` in `make test`).

Each deliberate-violation case copies the contracts' config and the root packages' sources into a
temporary tree, adds one offending module there and runs lint-imports on that copy in a subprocess:
the contract must break and name the offending import. The last test runs it on the real tree.
No network; each run takes well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACT_NAMES = {contract["id"]: contract["name"] for contract in CONFIG["contracts"]}
# The console script's entry point, run with this interpreter (no dependence on the venv's bin/).
LINT_IMPORTS = "import sys, importlinter.cli as cli; sys.exit(cli.lint_imports_command())"


def lint_imports(cwd: Path, *contract_ids: str) -> subprocess.CompletedProcess[str]:
    args = [arg for contract_id in contract_ids for arg in ("--contract", contract_id)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["COLUMNS"] = "200"  # rich wraps long contract names at 80 columns otherwise
    return subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-logo", "--no-cache", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def copy_tree(dest: Path) -> None:
    """pyproject.toml (hence the contracts, verbatim) and every root package's .py files."""
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")

    def not_python(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if not (Path(directory, n).is_dir() or n.endswith(".py"))} | {"__pycache__"}

    for package in CONFIG["root_packages"]:
        shutil.copytree(ROOT / package, dest / package, ignore=not_python)


# (contract id, {module path: source}, what the report must name)
VIOLATIONS = [
    (
        "inference-no-serve",
        {"inference/_violation.py": "import serve.config\n"},
        "inference._violation -> serve.config",
    ),
    (
        "loadtests-standalone",
        {"loadtests/_violation.py": "def f():\n    import cluster.multinode\n"},  # a lazy import counts too
        "loadtests._violation -> cluster.multinode",
    ),
    (
        "jobs-no-api",
        {"serve/jobs/_violation.py": "from serve.api import errors\n"},
        "serve.jobs._violation -> serve.api.errors",
    ),
    (
        "no-cycles",
        {
            "inference/_cycle_a.py": "from inference import _cycle_b\n",
            "inference/_cycle_b.py": "from inference import _cycle_a\n",
        },
        "No cycles are allowed in inference.",
    ),
]


@pytest.mark.parametrize(("contract_id", "modules", "named"), VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_a_deliberate_violation_breaks_its_contract(tmp_path, contract_id, modules, named):
    copy_tree(tmp_path)
    for relative, source in modules.items():
        (tmp_path / relative).write_text(source)
    result = lint_imports(tmp_path, contract_id)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"{CONTRACT_NAMES[contract_id]} BROKEN" in output, output
    assert named in output, output


def test_every_contract_is_exercised_by_a_deliberate_violation():
    assert {v[0] for v in VIOLATIONS} == set(CONTRACT_NAMES)


def test_the_real_tree_keeps_every_contract():
    result = lint_imports(ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Contracts: {len(CONTRACT_NAMES)} kept, 0 broken." in output, output
