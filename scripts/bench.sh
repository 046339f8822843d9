#!/usr/bin/env bash
# The benchmark (benchmarks/README.md): installs what it needs, then measures the middleware
# against the bare app in the same run. Arguments go to benchmarks/run.py (--quick, --parts ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
exec .venv/bin/python benchmarks/run.py "$@"
