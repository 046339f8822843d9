#!/usr/bin/env bash
# Create .venv and install the package (hot-path modules compiled by mypyc, see setup.py) with its
# development extras, once; compile again when a compiled module's source has changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed
stale=0
for compiled in src/budget_middleware/*.so; do
    [ -e "$compiled" ] || continue
    if [ "${compiled%%.cpython-*}.py" -nt "$compiled" ]; then
        stale=1
    fi
done
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt setup.py ]; then
    if [ "$stale" = 0 ]; then
        exit 0
    fi
    echo "bootstrap: a compiled module's source changed: compiling again" >&2
    .venv/bin/python -m pip install --quiet --no-deps -e .
else
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
fi
if ! .venv/bin/python -c "import budget_middleware, sys; sys.exit(not budget_middleware.COMPILED)"; then
    echo "bootstrap: the hot-path modules run as plain Python (mypyc could not compile them;" \
        "\`.venv/bin/pip install -v --no-deps -e .\` says why)" >&2
fi
touch "$stamp"
