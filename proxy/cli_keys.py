"""`llmrelay keys create | list | revoke`: gateway keys through a running gateway's admin API."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class AdminError(Exception):
    """The admin API refused, or could not be reached; the message says why (never the key)."""


def admin_request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The admin API's JSON answer; None for a 404 on GET (nothing there yet)."""
    key = args.admin_key or os.environ.get("LLMRELAY_ADMIN_KEY")
    if not key:
        raise AdminError("an admin key is needed: --admin-key or LLMRELAY_ADMIN_KEY")
    url = (args.url or os.environ.get("LLMRELAY_URL") or DEFAULT_URL).rstrip("/") + path
    try:
        response = httpx.request(method, url, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach the gateway at {url}: {type(exc).__name__}") from None
    if response.status_code == 404 and method == "GET":
        return None
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise AdminError(f"{response.status_code}: {detail}")
    return response.json() if response.content else None


def create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "is_test": args.test}
    for option, field in (("rate_limit", "rate_limit"), ("spending_limit", "spending_limit"),
                          ("max_usage", "max_usage"), ("expires", "expiry_date")):
        if getattr(args, option) is not None:
            body[field] = getattr(args, option)
    created = admin_request(args, "POST", "/api/temporary-keys/", body)
    print(f"created key {created['name']!r} (id {created['id']}); the secret is shown once:", file=sys.stderr)
    print(created["api_key"])
    return 0


def list_keys(args: argparse.Namespace) -> int:
    keys = admin_request(args, "GET", "/api/temporary-keys/")["results"]
    rows = [("ID", "NAME", "PREFIX", "ENV", "EXPIRES", "RATE/MIN", "SPEND USD", "MAX USES")]
    for k in keys:
        rows.append((k["id"], k["name"], k["prefix"] or "", k["environment"], k["expiry_date"] or "-",
                     _text(k["rate_limit"]), _text(k["spending_limit"]), "-" if k["max_usage"] == -1 else str(k["max_usage"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def revoke(args: argparse.Namespace) -> int:
    admin_request(args, "DELETE", f"/api/temporary-keys/{args.id}/")
    print(f"revoked key {args.id}", file=sys.stderr)
    return 0


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def add_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke gateway keys on a running gateway")
    keys.add_argument("--url", help=f"the gateway (default: LLMRELAY_URL, else {DEFAULT_URL})")
    keys.add_argument("--admin-key", help="an admin key (default: LLMRELAY_ADMIN_KEY)")
    actions = keys.add_subparsers(dest="action", required=True)
    p = actions.add_parser("create", help="create a key; prints its secret (shown once)")
    p.add_argument("name")
    p.add_argument("--rate-limit", type=int, help="requests per minute")
    p.add_argument("--spending-limit", type=float, help="USD, lifetime")
    p.add_argument("--max-usage", type=int, help="requests, lifetime")
    p.add_argument("--expires", help="ISO-8601 expiry time")
    p.add_argument("--test", action="store_true", help="a test-environment key")
    p.set_defaults(func=create)
    p = actions.add_parser("list", help="list the keys made through the admin API")
    p.set_defaults(func=list_keys)
    p = actions.add_parser("revoke", help="revoke a key by id")
    p.add_argument("id")
    p.set_defaults(func=revoke)
