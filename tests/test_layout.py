"""The layout keeps its promises (docs/architecture.md): the core knows no HTTP, no database, no
Redis and no event loop, and no module imports another that imports it back."""

from __future__ import annotations

import ast
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "budget_middleware"

# What the core may never import: web frameworks, HTTP clients, databases, Redis, event loops.
FORBIDDEN_IN_CORE = {
    "anyio",
    "asyncio",
    "django",
    "fastapi",
    "flask",
    "httpx",
    "httpx2",
    "psycopg",
    "redis",
    "sniffio",
    "sqlalchemy",
    "sqlmodel",
    "starlette",
    "trio",
    "uvicorn",
    "werkzeug",
}
# ...nor the package's adapters and backends.
CORE_MAY_IMPORT = ("budget_middleware.core", "budget_middleware.exceptions")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module `path` imports at run time, anywhere in it (not under `TYPE_CHECKING`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            # `from package import module` needs the module (and runs the package's __init__,
            # which must then not import back: packages here re-export nothing but `engine`)
            yield from submodules or [base]


def _is_module(name: str) -> bool:
    if not name.startswith("budget_middleware."):
        return False
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative).is_dir()


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_the_core_imports_no_web_database_redis_or_event_loop_library() -> None:
    found = []
    for name, path in modules().items():
        if not name.startswith("budget_middleware.core"):
            continue
        for imported in imports(path):
            top = imported.split(".")[0]
            if top in FORBIDDEN_IN_CORE:
                found.append(f"{name} imports {imported}")
            elif top == "budget_middleware" and not imported.startswith(CORE_MAY_IMPORT):
                found.append(f"{name} imports {imported} (outside the core)")
    print(f"{sum(n.startswith('budget_middleware.core') for n in modules())} core modules")
    assert found == []


def test_the_core_does_no_io() -> None:
    """No file, socket or process work in the core: it takes data and returns data."""
    io_calls = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "socket", "Popen"}
    found = []
    for name, path in modules().items():
        if not name.startswith("budget_middleware.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in io_calls:
                    found.append(f"{name}:{node.lineno} calls {called}")
    assert found == []


def test_no_coroutine_function_is_cached_by_a_cachetools_decorator() -> None:
    """PITFALLS: `@cached` on an `async def` caches the coroutine object, which can be awaited
    once; every later call would get the spent coroutine back."""
    found = []
    decorated = 0
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                called = (
                    target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                )
                if called in ("cached", "cachedmethod"):
                    decorated += 1
                    if isinstance(node, ast.AsyncFunctionDef):
                        found.append(f"{name}:{node.lineno} {node.name}")
    print(f"{decorated} functions under a cachetools decorator, {len(found)} of them async")
    assert found == []


# docs/architecture.md's table: the folders each folder may import (besides itself and the
# top-level modules `exceptions`, `settings`, `answers`, `headers`, which core may not but for
# `exceptions`).
MAY_IMPORT = {
    "core": set(),
    "store": {"core"},
    "manage": {"core", "store"},
    "engine": {"core", "store", "manage"},
    "outbound": {"core", "engine"},
    "asgi": {"core", "engine", "outbound"},
    "admin": {"core", "store", "manage", "engine"},
    "wsgi": {"core", "engine", "outbound", "admin"},
    "cli": {"core", "store", "manage"},
}
TOP_LEVEL = {"exceptions", "settings", "answers", "headers"}


def test_each_folder_imports_only_what_the_architecture_says() -> None:
    found = []
    for name, path in modules().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in MAY_IMPORT:
            continue
        folder = parts[1]
        for imported in imports(path):
            other = imported.split(".")
            if other[0] != "budget_middleware" or len(other) < 2 or other[1] == folder:
                continue
            if other[1] in TOP_LEVEL and folder != "core":
                continue
            if other[1] not in MAY_IMPORT[folder]:
                found.append(f"{name} imports {imported}")
    assert found == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = {
        name: {i for i in imports(path) if i in modules() and i != name}
        for name, path in modules().items()
    }
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start and len(trail) > 1:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    print(f"{len(graph)} modules, {sum(len(v) for v in graph.values())} imports between them")
    assert sorted(set(cycles))[:5] == []


if __name__ == "__main__":  # pragma: no cover - a quick look at the graph
    for name, path in sorted(modules().items()):
        print(name, sorted(i for i in imports(path) if i.startswith("budget_middleware")))
    sys.exit(0)


def test_the_cli_and_the_exceptions_load_without_the_heavy_libraries() -> None:
    """`import budget_middleware` is light (its exports are imported when first used), so the
    command's `--help` and `budget_middleware.exceptions` load no web framework, database,
    Redis or HTTP client; the exports still resolve."""
    import subprocess

    heavy = ("sqlalchemy", "sqlmodel", "starlette", "httpx", "redis", "anyio")
    probe = (
        "import sys, budget_middleware.cli, budget_middleware.exceptions\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "import budget_middleware as b\n"
        "print(b.BudgetMiddleware.__name__, b.charge_to.__name__, b.get_manager.__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded, exports = done.stdout.splitlines()
    print(f"heavy modules loaded by the CLI: {loaded}; exports: {exports}")
    assert loaded == "[]"
    assert exports == "BudgetMiddleware charge_to get_manager"


@pytest.mark.parametrize("name", ["BudgetWSGIMiddleware", "create_admin_wsgi_app"])
def test_the_wsgi_entry_points_are_importable_from_the_package(name: str) -> None:
    """SPEC §2: "Everything public is importable from `budget_middleware`"; §15's entry points
    were only in `budget_middleware.wsgi` (`from budget_middleware import BudgetWSGIMiddleware`:
    AttributeError)."""
    package = importlib.import_module("budget_middleware")
    wsgi = importlib.import_module("budget_middleware.wsgi")
    assert getattr(package, name) is getattr(wsgi, name)
    assert name in package.__all__ and name in dir(package)
