"""AWS Signature Version 4 for request headers, with hashlib and hmac only (no botocore).

The steps, as AWS documents them: a canonical request (method, canonical URI, canonical query,
canonical headers, signed header names, payload hash), a string to sign (algorithm, timestamp,
credential scope, hash of the canonical request), a signing key derived by chained HMAC-SHA256
(date, region, service, "aws4_request") and the hex HMAC of the string to sign with that key.

Services other than S3 encode the (already URL-encoded) path once more in the canonical URI:
`/model/a%3Ab/converse` is signed as `/model/a%253Ab/converse`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
UNRESERVED = "-_.~"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")."""
    key = _hmac(("AWS4" + secret).encode(), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, "aws4_request")


def canonical_uri(path: str, *, double_encode: bool = True) -> str:
    path = path or "/"
    return quote(path, safe="/" + UNRESERVED) if double_encode else path


def canonical_query(query: str) -> str:
    """Parameters sorted by (encoded) name then value, each name and value URI-encoded."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append((quote(name, safe=UNRESERVED + "%"), quote(value, safe=UNRESERVED + "%")))
    return "&".join(f"{n}={v}" for n, v in sorted(pairs))


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str], payload_hash: str,
                      *, double_encode: bool = True) -> tuple[str, str]:
    """(canonical request, signed header names). Header names lower-cased and sorted; values trimmed,
    inner runs of spaces collapsed."""
    canonical = {name.lower(): " ".join(str(value).split()) for name, value in headers.items()}
    names = sorted(canonical)
    signed = ";".join(names)
    header_block = "".join(f"{name}:{canonical[name]}\n" for name in names)
    request = "\n".join([method.upper(), canonical_uri(path, double_encode=double_encode), canonical_query(query),
                         header_block, signed, payload_hash])
    return request, signed


def string_to_sign(amz_date: str, scope: str, request: str) -> str:
    return "\n".join([ALGORITHM, amz_date, scope, sha256_hex(request.encode())])


def signature(secret: str, amz_date: str, region: str, service: str, request: str) -> str:
    date = amz_date[:8]
    scope = f"{date}/{region}/{service}/aws4_request"
    key = signing_key(secret, date, region, service)
    return hmac.new(key, string_to_sign(amz_date, scope, request).encode(), hashlib.sha256).hexdigest()


def host_header(url: str) -> str:
    """The Host header an HTTP client sends for a URL: the port only when it is not the default."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = 443 if parts.scheme == "https" else 80
    return f"{host}:{parts.port}" if parts.port and parts.port != default else host


def amz_now() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def sign_headers(method: str, url: str, headers: Mapping[str, str], body: bytes, *, access_key: str,
                 secret_key: str, region: str, service: str, session_token: str | None = None,
                 amz_date: str | None = None) -> dict[str, str]:
    """`headers` plus host, x-amz-date, x-amz-security-token (with a session token) and
    authorization. Every header given is signed, so pass only the ones that are sent as they are."""
    amz_date = amz_date or amz_now()
    out = {name.lower(): value for name, value in headers.items()}
    out["host"] = host_header(url)
    out["x-amz-date"] = amz_date
    if session_token:
        out["x-amz-security-token"] = session_token
    parts = urlsplit(url)
    request, signed = canonical_request(method, parts.path, parts.query, out, sha256_hex(body))
    sig = signature(secret_key, amz_date, region, service, request)
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    out["authorization"] = f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={sig}"
    return out
