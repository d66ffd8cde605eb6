"""The built-in chat UI: static files shipped in the package (``ferry/server/webui/``).

``GET /`` answers ``index.html``; ``GET /ui/{name}`` answers one of the other files. Only
the names found in the package directory at start are served (a fixed table, so no path
can escape it), with a strict Content-Security-Policy: the page loads nothing from the
network but its own files and talks only to this server. ``web_ui: false``
(``--no-web-ui``) leaves both routes out.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ferry.server.errors import APIError

_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
# Everything comes from this origin; no inline script, no eval, no frames.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def load_files() -> dict[str, tuple[bytes, str]]:
    """``{name: (content, media type)}`` of every file of the UI's package directory."""
    files = {}
    for entry in resources.files("ferry.server").joinpath("webui").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in _MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    if "index.html" not in files:
        raise RuntimeError("the web UI's index.html is missing from the installed package")
    return files


def webui_router() -> APIRouter:
    """``GET /`` and ``GET /ui/{name}``, serving the files read once here."""
    files = load_files()
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> Response:
        content, _ = files["index.html"]
        return HTMLResponse(content, headers=_HEADERS)

    @router.get("/ui/{name}")
    async def asset(name: str) -> Response:
        if name not in files:
            raise APIError(404, f"no web UI file named {name!r}", code="not_found")
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=_HEADERS)

    return router
