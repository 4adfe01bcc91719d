"""The built-in dashboard at /dashboard: static HTML, JS and CSS.

The page holds no data, so it is served without a key; every figure comes from the admin APIs,
which the page calls with the admin key the user signs in with.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import PurePosixPath

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

INDEX = "index.html"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Defence in depth for a page that shows logged prompts: no inline script, nothing from elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class Asset:
    """One static file, read once: its bytes, content type and ETag."""

    def __init__(self, name: str, body: bytes) -> None:
        self.body = body
        self.media_type = CONTENT_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream")
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'

    def response(self, request: Request) -> Response:
        # no-cache: the browser revalidates (a cheap 304), so a new release is picked up at once
        headers = {"ETag": self.etag, "Cache-Control": "no-cache", **SECURITY_HEADERS}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_assets() -> dict[str, Asset]:
    """Every file in the package's static/ folder, by file name (the only names ever served)."""
    folder = resources.files(__package__) / "static"
    return {entry.name: Asset(entry.name, entry.read_bytes()) for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".") and PurePosixPath(entry.name).suffix in CONTENT_TYPES}


def routes() -> list[Route]:
    """GET /dashboard (and /dashboard/) and GET /dashboard/static/{name}."""
    assets = load_assets()
    index = assets[INDEX]

    async def page(request: Request) -> Response:
        return index.response(request)

    async def static(request: Request) -> Response:
        # a dict lookup by plain file name: "..", "/" or anything not shipped is simply not there
        asset = assets.get(request.path_params["name"])
        if asset is None:
            return JSONResponse({"detail": "Not found."}, 404)
        return asset.response(request)

    return [
        Route("/dashboard", page, methods=["GET"]),
        Route("/dashboard/", page, methods=["GET"]),
        Route("/dashboard/static/{name}", static, methods=["GET"]),
    ]
