#!/usr/bin/env bash
# The test command of the README's quick start, and of CI: installs what it needs, then runs
# lint, types and the whole test suite (SQLite and, when reachable, PostgreSQL and Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check src tests examples benchmarks scripts
.venv/bin/ruff format --check src tests examples benchmarks scripts
.venv/bin/mypy --strict src/budget_middleware
exec .venv/bin/python -m pytest "$@"
