#!/usr/bin/env bash
# The one command for the GPU machine, run from the repo root with .whl carried along:
#
#     bash scripts/gpu_check_remote.sh [benchmarks/gpu_check.py options]
#
# Installs .whl/*.whl (scripts/gpu_wheels.sh, run beforehand where pip works) into /tmp/site unless
# diffusers is importable already, puts /tmp/site and the repo on PYTHONPATH, and runs the check
# unbuffered. With $OUT set, the table, the JSON and the whole log go there (the table and JSON are
# rewritten after every section, so a run stopped at its time limit still leaves what it measured).
# The check keeps to --budget-s (default 420 s) from its start; give the call about 540 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
site=
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "diffusers is not importable and .whl/ holds no wheels: run scripts/gpu_wheels.sh first" \
      "and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 2
  site=/tmp/site
fi
export PYTHONPATH="${site:+$site:}.${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
args=("$@")
if [ -n "${OUT:-}" ]; then
  args+=(--json "$OUT/gpu_check.json" --table "$OUT/gpu_check.md")
fi
{
  "$PY" - <<'PY' || true
import importlib.metadata as m
import sys

names = ("torch", "diffusers", "transformers", "huggingface_hub", "safetensors")
print("python", sys.version.split()[0], *(f"{n} {m.version(n)}" for n in names), flush=True)
PY
  "$PY" benchmarks/gpu_check.py "${args[@]}"
} 2>&1 | tee ${OUT:+"$OUT/gpu_check.log"}
exit "${PIPESTATUS[0]}"
