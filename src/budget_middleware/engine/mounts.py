"""Where the host app serves the admin API, for the start-up line: read once, at start-up.

What can be read: a Starlette or FastAPI router (`app.mount("/budget-admin", create_admin_app())`,
through any middleware in front of it), werkzeug's `DispatcherMiddleware` (Flask's
`app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {...})`, found through the Flask app) and
Django's URL conf (`admin_urls("budget-admin/")`, under its ASGI and WSGI handlers). Anything
else (a bare ASGI or WSGI function, a mount around the app this middleware is given) cannot be
read: the line says so rather than "no admin API mounted". And whether the app a middleware was
given is Django's handler (`refuse_django_chain`): listed in `MIDDLEWARE`, it cannot work.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
import sys
from typing import Any, Final

from budget_middleware.exceptions import ConfigurationError

__all__ = ["UNKNOWN", "admin_mount", "announce", "refuse_django_chain"]

logger = logging.getLogger("budget_middleware")

UNKNOWN: Final = "unknown"
"""`admin_mount`'s answer when the host app's routes cannot be read."""


def admin_mount(app: Any) -> str | None:
    """The path the admin API is mounted at, None when the app has none, or `UNKNOWN`."""
    try:
        return _find(app, "", set())
    except Exception:  # a host app's internals: never a reason to stop the start
        return UNKNOWN


def refuse_django_chain(app: Any, middleware: str) -> None:
    """Raise `ConfigurationError` when `app` is the handler Django gives an entry of its
    `MIDDLEWARE` setting: the middleware was listed there, where Django calls it with a request
    and it fails every request with a `TypeError`. It wraps the application in `wsgi.py` or
    `asgi.py` instead (README, "Django")."""
    # Django's handler there is a function or a method of its `django.core.handlers` (one of
    # asgiref's wrappers in an async chain); the application itself is an instance of a class
    # of theirs (`WSGIHandler`, `ASGIHandler`), wrapped as it should be. The module is the one
    # the code was written in (its globals'): `convert_exception_to_response` wraps the next
    # middleware with `functools.wraps`, which gives its function that middleware's
    # `__module__` (`django.middleware.common`) when ours is listed above another.
    if inspect.isfunction(app) or inspect.ismethod(app):
        code = app.__func__ if inspect.ismethod(app) else app
        if not str(code.__globals__.get("__name__", "")).startswith("django.core.handlers."):
            return
    elif type(app).__module__ != "asgiref.sync":
        return
    raise ConfigurationError(
        f"{middleware} wraps an application, not Django's request handler: it cannot be listed "
        "in settings.MIDDLEWARE. Wrap the application instead: in wsgi.py, `application = "
        "BudgetWSGIMiddleware(get_wsgi_application())`; in asgi.py, `application = "
        "BudgetMiddleware(get_asgi_application())`"
    )


def _is_admin(app: Any) -> bool:
    state = getattr(app, "state", None)
    if state is not None and hasattr(state, "budget"):  # create_admin_app()
        return True
    return _is_admin(app.asgi) if type(app).__name__ == "AdminWSGIApp" else False


def _find(app: Any, prefix: str, seen: set[int]) -> str | None:
    for _ in range(50):
        if app is None or id(app) in seen:
            return UNKNOWN
        seen.add(id(app))
        if _is_admin(app):
            return prefix or "/"
        routes = getattr(app, "routes", None)
        if isinstance(routes, list):  # a Starlette router (or an app holding one)
            for route in routes:
                mounted = getattr(route, "app", None)
                at = prefix + str(getattr(route, "path", ""))
                if mounted is not None and _is_admin(mounted):
                    return at or "/"
                if isinstance(getattr(route, "routes", None), list):  # a Mount of a router
                    below = _find(route, at, seen)
                    if below not in (None, UNKNOWN):
                        return below
            return None
        mounts = getattr(app, "mounts", None)
        if isinstance(mounts, dict):  # werkzeug's DispatcherMiddleware
            for path, mounted in mounts.items():
                below = _find(mounted, prefix + str(path), seen)
                if below not in (None, UNKNOWN):
                    return below
        module = type(app).__module__
        if module.startswith("django.core.handlers."):
            return _django_mount(prefix)
        owner = getattr(app, "__self__", None)  # Flask's `app.wsgi_app`, a bound method
        if owner is not None and getattr(owner, "wsgi_app", None) is not None:
            outer = owner.wsgi_app  # what Flask serves now: the dispatcher set after the middleware
            if id(outer) not in seen and getattr(outer, "__self__", None) is not owner:
                app = outer
                continue
            return UNKNOWN  # a mount around the Flask app itself is not seen from here
        app = getattr(app, "app", None)
    return UNKNOWN


def _django_mount(prefix: str) -> str | None:
    """Where Django's URL conf has `admin_urls`' view, or None."""
    urls = importlib.import_module("django.urls")

    def walk(patterns: Any, at: str) -> str | None:
        for pattern in patterns:
            below = getattr(pattern, "url_patterns", None)
            if below is not None:  # include(...)
                found = walk(below, at + _route_text(pattern.pattern))
                if found is not None:
                    return found
                continue
            mount = getattr(getattr(pattern, "callback", None), "budget_admin_mount", None)
            if mount is not None:
                return at + str(mount)
        return None

    found = walk(urls.get_resolver().url_patterns, "")
    return None if found is None else prefix + "/" + found.lstrip("/")


def _route_text(pattern: Any) -> str:
    """An `include()`'s prefix as text: a `path()` route as written, a `re_path()` regex
    without its anchor and escapes."""
    text = str(pattern)
    if type(pattern).__name__ == "RegexPattern":
        text = re.sub(r"\\(.)", r"\1", text.lstrip("^"))
    return text


def announce(line: str) -> None:
    """The start-up line: logged at INFO; printed to stderr when no logging is configured, so
    a first run says which store and Redis it uses."""
    if logger.hasHandlers():
        logger.info(line)
    else:
        sys.stderr.write(line + "\n")
