"""The built-in dashboard at /dashboard (static files; the data comes from the admin APIs)."""

from __future__ import annotations

from starlette.routing import Route


def routes() -> list[Route]:
    return []
