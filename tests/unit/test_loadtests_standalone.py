"""loadtests/ is black box: no module of it imports the service, the engine or other repository code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOADTESTS = REPO / "loadtests"
FORBIDDEN = ("serve", "inference", "benchmarks", "cluster", "tests")

# Imports every loadtests module (``__main__`` and the locustfile included) in a fresh interpreter that
# CAN import the forbidden packages (the repository root is on sys.path), then lists which got loaded.
_PROBE = """
import importlib, importlib.util, json, pathlib, sys
forbidden, names = json.loads(sys.argv[1])
assert importlib.util.find_spec("serve") and importlib.util.find_spec("benchmarks"), "probe cannot fail"
for name in names:
    importlib.import_module(name)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(forbidden))))
"""


def _module_names() -> list[str]:
    return ["loadtests", *(f"loadtests.{path.stem}" for path in sorted(LOADTESTS.glob("*.py")))]


def test_importing_every_loadtests_module_loads_no_repository_package():
    names = _module_names()
    assert {"loadtests.soak", "loadtests.stack", "loadtests.locustfile", "loadtests.__main__"} <= set(names)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([FORBIDDEN, names])],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_no_loadtests_source_imports_a_repository_package_even_lazily():
    """Every import statement, at any depth (inside functions too), and ``importlib.import_module``."""
    offenders = []
    for path in sorted(LOADTESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module]
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", getattr(node.func, "id", ""))
                in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]
            else:
                continue
            offenders += [
                f"{path.name}:{node.lineno} {target}"
                for target in targets
                if target.split(".")[0] in FORBIDDEN
            ]
    assert offenders == []
