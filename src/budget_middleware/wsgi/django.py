"""The admin API under a Django URL prefix (SPEC §15):

    from budget_middleware.wsgi.django import admin_urls
    urlpatterns = [*admin_urls("budget-admin/"), ...]

A view forwards every request under the prefix to `create_admin_wsgi_app()` (on the engine the
middleware shares, for equal settings), under Django's WSGI handler and its ASGI handler alike
(`get_asgi_application()`: a project's one URL conf serves both). It is CSRF-exempt: the admin
API authenticates with `Authorization: Bearer $BUDGET_ADMIN_KEY`, never a cookie, and needs no
Django login (`LoginRequiredMiddleware` lets it through). Django is an optional extra
(`budget-middleware[django]`); this module imports it only when called.
"""

from __future__ import annotations

import importlib
import io
import re
from typing import Any

from budget_middleware.settings import BudgetSettings
from budget_middleware.wsgi.admin import AdminWSGIApp, asgi_scope, holds_admin_key, serve


def admin_urls(prefix: str = "budget-admin/", settings: BudgetSettings | None = None) -> list[Any]:
    """URL patterns that serve the admin API under `prefix` (`"budget-admin/"`: at
    `/budget-admin/customers`, `/budget-admin/health`, ...)."""
    urls = importlib.import_module("django.urls")
    http = importlib.import_module("django.http")
    csrf = importlib.import_module("django.views.decorators.csrf")
    mount = prefix.strip("/")
    admin = AdminWSGIApp(settings)

    def view(request: Any, rest: str | None = None, **captured: Any) -> Any:
        # `captured`: what an outer `include` captures (`<str:tenant>/`): not the API's
        environ = _environ(request)
        script = environ.get("SCRIPT_NAME", "").rstrip("/")
        path = environ.get("PATH_INFO", "")
        marker = "/" + mount
        # Where Django matched the mount: the path's end is `rest` (an outer path may hold the
        # marker too: `admin-tools/` around `admin_urls("admin/")`).
        matched = marker + _wsgi_text(rest or "")
        at = len(path) - len(matched) if path.endswith(matched) else path.find(marker)
        below = path[at + len(marker) :] if at >= 0 else "/" + (rest or "").lstrip("/")
        environ["SCRIPT_NAME"] = script + path[: at + len(marker)] if at >= 0 else script + marker
        environ["PATH_INFO"] = below or "/"
        # Read for the admin key's bearer only (as the admin app reads): the API reads no other
        # caller's body (it answers 401 first), and anyone could have this thread hold it.
        body = b""
        if holds_admin_key(environ, admin.engine.settings.admin_key):
            body = request.body  # through Django, within its DATA_UPLOAD_MAX_MEMORY_SIZE
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]], exc: Any = None) -> Any:
            started[:] = [status, headers]
            return lambda data: None

        if hasattr(request, "environ"):  # Django's WSGI handler: on the engine's loop (its own)
            content = b"".join(admin(environ, start_response))
            status: int = int(started[0][:3])
            headers: list[tuple[str, str]] = started[1]
        else:
            # Django's ASGI handler runs this sync view in a thread: the admin app runs on the
            # server's loop, where the ASGI middleware runs the engine (started there if not
            # yet). Sent to the WSGI adapter's background loop instead, an engine not started
            # yet started there, and the middleware then used it from the server's loop.
            to_sync = importlib.import_module("asgiref.sync").async_to_sync
            status, raw, content = to_sync(serve)(admin.asgi, asgi_scope(environ), body)
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
        response = http.HttpResponse(content, status=status)
        # Django measures the content; a HEAD's is none (the admin app sends its headers
        # alone), and its length is the GET's, as the admin app tells it (RFC 9110 8.6).
        head = request.method == "HEAD"
        for name, value in headers:
            if head or name.lower() != "content-length":
                response[name] = value
        return response

    exempt = csrf.csrf_exempt(view)
    # Nor does it need a Django login: a site private by default (Django 5.1's
    # `LoginRequiredMiddleware`) sends every view not marked so to its login page. The mark
    # `login_not_required` sets, without importing `django.contrib.auth` (an app may have none).
    exempt.login_required = False
    exempt.budget_admin_mount = mount  # where the start-up line finds it (engine/mounts.py)
    return [urls.re_path(rf"^{re.escape(mount)}(?P<rest>/.*)?$", exempt)]


def _environ(request: Any) -> dict[str, Any]:
    """The request as a WSGI environ: the server's, under Django's WSGI handler; under its ASGI
    handler (whose request has no `environ`), the `META` Django made of the scope, which holds
    the same CGI names."""
    wsgi = getattr(request, "environ", None)
    environ = dict(request.META if wsgi is None else wsgi)
    if wsgi is None:
        environ["wsgi.url_scheme"] = request.scheme
        # Django decoded the query string (UTF-8); WSGI's is the latin-1 text of its bytes.
        environ["QUERY_STRING"] = _wsgi_text(environ.get("QUERY_STRING", ""))
        # The path as the client sent it (`%2F` kept), where the admin app reads it (`RAW_URI`)
        raw = getattr(request, "scope", {}).get("raw_path")
        if isinstance(raw, bytes):
            environ["RAW_URI"] = raw.decode("latin-1")
    # Both handlers put the path in META decoded (UTF-8; the WSGI one over the server's
    # environ): as WSGI text again, or a path outside latin-1 (`/tags/产品`) cannot be passed.
    for name in ("SCRIPT_NAME", "PATH_INFO"):
        environ[name] = _wsgi_text(environ.get(name, ""))
    return environ


def _wsgi_text(value: str) -> str:
    """Text Django decoded from UTF-8 as PEP 3333 gives it: the latin-1 text of its bytes."""
    return value.encode("utf-8", "surrogateescape").decode("latin-1")
