"""`create_admin_wsgi_app()`: the admin API (SPEC §9) for WSGI hosts.

The same app as `create_admin_app()`, served from WSGI: each request runs on the engine's event
loop (the background one a WSGI middleware uses) and its answer is handed back to the calling
thread whole (admin answers are small). Mount it with werkzeug's `DispatcherMiddleware` (Flask)
or `budget_middleware.wsgi.django.admin_urls` (Django): `SCRIPT_NAME` is its mount point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from budget_middleware.admin.auth import admin_token, is_admin_key
from budget_middleware.admin.context import MAX_BODY_BYTES
from budget_middleware.engine.engine import BudgetEngine, get_engine
from budget_middleware.engine.portal import on_loop
from budget_middleware.settings import BudgetSettings
from budget_middleware.wsgi.middleware import environ_bytes, read_rest, status_line

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

Message = MutableMapping[str, Any]


class AdminWSGIApp:
    """The admin API as a WSGI app, on the engine shared with the middleware (equal settings)."""

    def __init__(self, settings: BudgetSettings | None = None) -> None:
        from budget_middleware.admin.app import create_admin_app

        self.settings = settings
        self.asgi = create_admin_app(settings)  # no I/O, no environment read yet
        self._engine: BudgetEngine | None = None

    @property
    def engine(self) -> BudgetEngine:
        if self._engine is None:  # held: the middleware's engine, for as long as this app lives
            self._engine = get_engine(self.settings)
        return self._engine

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        scope = asgi_scope(environ)
        # Read for the admin key's bearer only: the API reads no other caller's body (it
        # answers 401 first), and anyone could have this thread hold what they announce.
        admin = holds_admin_key(environ, self.engine.settings.admin_key)
        body = _read_all(environ) if admin else b""
        status, headers, content = on_loop(self.engine, lambda: serve(self.asgi, scope, body))
        start_response(
            status_line(status), [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        )
        if scope["method"] == "HEAD":  # its headers alone, as an ASGI server sends them (some
            return []  # WSGI servers, waitress, send what the app gives: a body after them)
        return [content]


def asgi_scope(environ: WSGIEnvironment) -> dict[str, Any]:
    """The ASGI scope of a WSGI request (the mount point, `SCRIPT_NAME`, as `root_path`). Its
    bytes are the latin-1 of WSGI's text; a test client's text beyond it (httpx's path,
    werkzeug's header values) as UTF-8 (`environ_bytes`), never a UnicodeEncodeError."""
    script = _text(environ.get("SCRIPT_NAME", ""))
    path = _text(environ.get("PATH_INFO", "")) or "/"
    headers: list[tuple[bytes, bytes]] = []
    for name, value in environ.items():
        if name.startswith("HTTP_"):
            headers.append((name[5:].replace("_", "-").lower().encode("latin-1"),
                            environ_bytes(value)))  # fmt: skip
    for name, header in (("CONTENT_TYPE", b"content-type"), ("CONTENT_LENGTH", b"content-length")):
        value = environ.get(name)
        if value:
            headers.append((header, value.encode("latin-1")))
    client = environ.get("REMOTE_ADDR")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": environ.get("SERVER_PROTOCOL", "HTTP/1.1").partition("/")[2] or "1.1",
        "method": environ["REQUEST_METHOD"],
        "scheme": environ.get("wsgi.url_scheme", "http"),
        "root_path": script,
        "path": script + path,
        "raw_path": _raw_path(environ),
        "query_string": environ.get("QUERY_STRING", "").encode("latin-1"),
        "headers": headers,
        "server": (environ.get("SERVER_NAME", "localhost"), _port(environ.get("SERVER_PORT"))),
        "client": (client, _port(environ.get("REMOTE_PORT")) or 0) if client else None,
        "state": {},
    }


def _raw_path(environ: WSGIEnvironment) -> bytes:
    """The path as the client wrote it (ASGI's `raw_path`): from the request line the server
    keeps (`RAW_URI`: gunicorn's, werkzeug's; `REQUEST_URI`: waitress's, werkzeug's), where it
    is the path WSGI decoded (`SCRIPT_NAME` + `PATH_INFO`); else that decoded path. WSGI decodes
    `%2F` to `/`: the admin API tells a tag or an id ending in `%2F` from a trailing slash the
    client wrote (redirected) by this."""
    decoded = environ_bytes(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""))
    for name in ("RAW_URI", "REQUEST_URI"):
        uri = environ.get(name)
        if not isinstance(uri, str) or not uri:
            continue
        raw = environ_bytes(uri).split(b"?", 1)[0].split(b"#", 1)[0]
        if not raw.startswith(b"/"):  # the absolute form (`http://host/path`): its path
            _, _, rest = raw.partition(b"://")
            raw = b"/" + rest.partition(b"/")[2] if rest else raw
        if unquote_to_bytes(raw) == decoded:
            return raw
    return decoded


def _port(value: object) -> int | None:
    """A port from the environ (text; werkzeug's server gives `REMOTE_PORT` as an int); None
    where it is no number (waitress on a unix socket names the socket there: ASGI's `server`
    of a unix socket has no port)."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def _text(value: str) -> str:
    """A WSGI path (latin-1 text of the bytes sent) as ASGI has it (UTF-8 decoded)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


def holds_admin_key(environ: WSGIEnvironment, admin_key: str | None) -> bool:
    """Whether the request's bearer token is `admin_key` (in constant time, as the API checks)."""
    if admin_key is None:
        return False
    token = admin_token(environ.get("HTTP_AUTHORIZATION", ""), admin_key)
    return token is not None and is_admin_key(token, admin_key)


def _read_all(environ: WSGIEnvironment) -> bytes:
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = environ.get("CONTENT_LENGTH")
    if length:
        try:
            size = int(length)
        except ValueError:
            size = 0
        if size > MAX_BODY_BYTES:  # the admin API answers 413 on the length: none read
            return b""
        body = bytes(stream.read(size)) if size > 0 else b""
        return read_rest(stream, size, body) if len(body) < size else body
    if environ.get("wsgi.input_terminated"):
        return bytes(stream.read(MAX_BODY_BYTES + 1))  # past the bound: the API's 413
    return b""


async def serve(app: Any, scope: dict[str, Any], body: bytes) -> tuple[int, list[Any], bytes]:
    """Run the ASGI app for one request; its status, headers and whole body."""
    status = 500
    headers: list[Any] = []
    chunks: list[bytes] = []
    sent = False
    done = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return status, headers, b"".join(chunks)
