"""`python -m budget_middleware`: the `budget-middleware` command (SPEC §16)."""

from __future__ import annotations

from budget_middleware.cli import main

if __name__ == "__main__":
    main()
