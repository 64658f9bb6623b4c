#!/usr/bin/env bash
# Create the project virtual environment from nothing. Idempotent: re-running is cheap.
# torch==2.13.0 goes in FIRST: any other torch version (asked for directly or through another
# package's range) would pull GBs of CUDA packages; with 2.13.0 installed, `torch>=2.4` is satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-model,serve,test}
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[${EXTRAS}]"
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}: refusing CUDA downloads"
PY
# The integration tests scrape Ray's exporter with a real Prometheus (Debian's package, run as a plain binary).
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
  else
    echo "prometheus is missing: install Debian's 'prometheus' package (needs root)" >&2
    exit 1
  fi
fi
# The control-plane tests run a real Redis (Debian's package; each test starts its own redis-server on a
# free port). It brings redis-cli too, which tests/integration/test_k8s_manifests.py runs as the probes do.
if [[ ",$EXTRAS," == *",test,"* ]] && ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server
  else
    echo "redis-server is missing: install Debian's 'redis-server' package (needs root)" >&2
    exit 1
  fi
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
echo "environment ready in $VENV"
