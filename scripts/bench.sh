#!/usr/bin/env bash
# The benchmark (benchmarks/README.md): installs what it needs, then measures the middleware
# against the bare app in the same run. Arguments go to benchmarks/run.py (--quick, --parts ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
# wrk drives the HTTP part (its Python fallback takes more CPU from a small machine's server).
if ! command -v wrk >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "bench: installing wrk (apt-get install wrk), for the HTTP part" >&2
    apt-get install -y -qq wrk >/dev/null 2>&1 || echo "bench: no wrk; loadgen.py is used" >&2
fi
exec .venv/bin/python benchmarks/run.py "$@"
