"""Build: the package in pure Python, its hot-path modules compiled by mypyc where possible.

The modules in `COMPILED` hold the synchronous work of every metered request (admission and
settlement, counters, the caller's identity, usage, streams). mypyc compiles them, unchanged, to C
extensions that sit next to their sources; the modules with coroutines stay interpreted (anyio's
cancel scopes must see Python coroutines). Behaviour is the same either way, only the speed differs:
`budget_middleware.COMPILED` says which is installed.

When compiling is not possible (mypyc or a C compiler missing, or a compile error), or
`BUDGET_MIDDLEWARE_PURE_PYTHON=1` is set, the package installs as plain Python.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup

COMPILED = ("admission", "limits", "scopes", "identity", "usage", "sse", "limit_headers")
# pip runs this file for metadata too; mypyc (~30 s) runs only for what builds extensions.
_BUILDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def _extensions() -> list[Any]:
    if os.environ.get("BUDGET_MIDDLEWARE_PURE_PYTHON") == "1":
        return []
    if not _BUILDS.intersection(sys.argv[1:]):
        return []
    try:
        from mypyc.build import mypycify

        extensions = mypycify(
            [
                # The build environment has none of the runtime dependencies: their types are
                # Any here, and what that makes of the modules left interpreted is not reported
                # (`mypy --strict`, with the dependencies, checks everything; see pyproject).
                "--config-file=",
                "--ignore-missing-imports",
                "--follow-imports=silent",
                *(f"src/budget_middleware/{name}.py" for name in COMPILED),
            ],
            opt_level="3",
        )
    except BaseException as exc:  # mypyc missing, or a type error it cannot compile past
        print(f"budget-middleware: not compiled, pure Python ({exc!r})", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: build_ext skips it, the .py is used
    return list(extensions)


setup(ext_modules=_extensions())
