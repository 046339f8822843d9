#!/usr/bin/env bash
# The demo of the README's quick start: an example app on the default store, SQLite (a file of its own).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh >/dev/null
exec .venv/bin/python examples/demo.py "$@"
