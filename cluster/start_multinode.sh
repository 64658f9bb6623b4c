#!/usr/bin/env bash
# A multi-node Ray cluster on this machine: head + a separately started inference node, the app
# deployed with model replicas on the inference node. See cluster/multinode.py for the details.
#   cluster/start_multinode.sh start|deploy|status|stop   (or `up` = start + deploy + status)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${VENV:-.venv}/bin/python" cluster/multinode.py "$@"
