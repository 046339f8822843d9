"""The example app with `floor.Least` in front of it instead of the middleware, served by
`floor.py --http` (the key `Least` knows comes in BENCH_KEY)."""

from __future__ import annotations

import importlib
import os

from floor import Least  # its `harness` import puts the examples and the package on the path

os.environ["BUDGET_NO_MIDDLEWARE"] = "1"  # the example app bare; `Least` added below
app = importlib.import_module("app").build_app()
app.add_middleware(Least, key=os.environ["BENCH_KEY"])
