"""`GET /ui`: the dashboard (SPEC §16), a page and its assets shipped inside the package.

The page and its assets hold no data and need no admin key (SPEC §9): the page asks for the key
once, keeps it in the tab's `sessionStorage` and sends it with each call to the admin API, which it
finds next to itself (the page at `<mount>/ui` calls `<mount>/budgets`, ...). Plain HTML, CSS and
JavaScript: no build step, nothing fetched from anywhere but the admin app (the page's
Content-Security-Policy says so to the browser).

Caching: the page is revalidated on every load (`no-cache`, with an ETag) and names its assets with
a digest of their content (`ui/dashboard.js?v=<digest>`), so an asset asked for with its current
digest is cached for good, and an upgraded package is picked up at the next load.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from budget_middleware.admin.answers import error

__all__ = ["ASSETS", "dashboard_routes"]

PAGE = "index.html"
ASSETS = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
"""The files served under `/ui/`, with their content types; any other name is a 404."""

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FOREVER = "public, max-age=31536000, immutable"


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    media_type: str
    digest: str  # of the body: names this version (`?v=`) and is its ETag

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def _read(name: str) -> bytes:
    return (files("budget_middleware.admin") / "static" / name).read_bytes()


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:20]


class _Files:
    """The page and its assets, read from the package on first use and kept."""

    def __init__(self) -> None:
        self._files: dict[str, _File] | None = None

    def get(self, name: str) -> _File:
        if self._files is None:
            self._files = self._load()
        return self._files[name]

    @staticmethod
    def _load() -> dict[str, _File]:
        loaded: dict[str, _File] = {}
        for name, media_type in ASSETS.items():
            body = _read(name)
            loaded[name] = _File(body, media_type, _digest(body))
        page = _read(PAGE).decode("utf-8")
        for name, asset in loaded.items():  # `ui/dashboard.js` -> `ui/dashboard.js?v=<digest>`
            page = page.replace(f'"ui/{name}"', f'"ui/{name}?v={asset.digest}"')
        body = page.encode("utf-8")
        loaded[PAGE] = _File(body, "text/html; charset=utf-8", _digest(body))
        return loaded


def _answer(request: Request, file: _File, headers: dict[str, str]) -> Response:
    headers = {**headers, "ETag": file.etag}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


def dashboard_routes() -> list[BaseRoute]:
    """`/ui` (the page), `/ui/` (redirected to it) and `/ui/{asset}`; GET and HEAD."""
    found = _Files()

    async def page(request: Request) -> Response:
        return _answer(request, found.get(PAGE), _PAGE_HEADERS)

    async def asset(request: Request) -> Response:
        name = request.path_params["asset"]
        if name == "":  # `/ui/`: the admin app's 307 to `/ui`, as for every route with a slash
            raise HTTPException(404)
        if name not in ASSETS:
            shown = name if len(name) <= 100 else name[:100] + "…"
            return error(404, "route_not_found", f"no dashboard asset {shown!r}")
        file = found.get(name)
        current = request.query_params.get("v") == file.digest
        cache = _FOREVER if current else "no-cache"
        return _answer(request, file, {"Cache-Control": cache, "X-Content-Type-Options": "nosniff"})

    return [
        Route("/ui", page, methods=["GET"], name="dashboard"),
        Route("/ui/{asset:path}", asset, methods=["GET"], name="dashboard_asset"),
    ]
