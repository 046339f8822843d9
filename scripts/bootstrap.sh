#!/usr/bin/env bash
# Create .venv and install the package (plain Python, editable) with its development extras, once;
# again when pyproject.toml changes. A first run downloads and installs ~60 packages (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    exit 0
fi
echo "bootstrap: creating .venv and installing budget-middleware with its dev extras (first run: about a minute)..." >&2
started=$(date +%s)
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
touch "$stamp"
echo "bootstrap: done in $(( $(date +%s) - started )) s" >&2
