#!/usr/bin/env bash
# Mutation testing of budget_middleware.core (scripts/mutate.py): installs what it needs, then
# mutates every core module and runs the tests that reach each mutant. Arguments go to
# scripts/mutate.py (--module core/windows.py, --list, --id windows-12 --show, --min 90).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/mutate.py "$@"
