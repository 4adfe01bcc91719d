"""Google OAuth 2.0 access tokens from a service-account key (the JWT bearer grant, RFC 7523).

A service-account JSON (`type: service_account`) holds `client_email`, `private_key` (an RSA key in
PEM, PKCS#8 or PKCS#1), `token_uri` and `project_id`. For a token the gateway signs a JWT with
header `{"alg": "RS256", "typ": "JWT"}` and claims `iss` = client_email, `scope` =
cloud-platform, `aud` = token_uri, `iat` = now, `exp` = now + 1 h, and POSTs
`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>` to token_uri; the answer
is `{"access_token", "expires_in", "token_type": "Bearer"}`.

RS256 (RSASSA-PKCS1-v1_5 with SHA-256) is done here without a crypto dependency: the PEM is
decoded with a small DER reader and the signature is a modular exponentiation (with the CRT
parameters of the key). Signing only runs once per token (about once an hour per service account).

Tokens are cached per service account (client_email, key and token_uri) until REFRESH_MARGIN
before they expire; concurrent requests that find no valid token share one refresh.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from typing import Any
from urllib.parse import urlencode, urlsplit

import orjson

from proxy.egress import EgressDenied
from proxy.errors import GatewayError, UpstreamUnavailable
from proxy.upstream import UpstreamClient

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
JWT_LIFETIME = 3600  # seconds: Google's maximum
REFRESH_MARGIN = 300  # a cached token is renewed this many seconds before it expires
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_RSA_OID = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1 rsaEncryption


class InvalidServiceAccount(ValueError):
    """The service-account JSON cannot be used (the message never contains the key)."""


# -- DER / PEM ------------------------------------------------------------------------------


def _der_item(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """(tag, content, position after the item) of the DER item at `pos`."""
    if pos + 2 > len(data):
        raise InvalidServiceAccount("private_key: truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise InvalidServiceAccount("private_key: bad DER length")
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise InvalidServiceAccount("private_key: truncated DER")
    return tag, data[pos:pos + length], pos + length


def _der_sequence(data: bytes) -> list[tuple[int, bytes]]:
    """The items inside one DER SEQUENCE."""
    tag, content, _ = _der_item(data, 0)
    if tag != 0x30:
        raise InvalidServiceAccount("private_key: expected a DER SEQUENCE")
    items, pos = [], 0
    while pos < len(content):
        item_tag, item, pos = _der_item(content, pos)
        items.append((item_tag, item))
    return items


def _pem_der(pem: str) -> tuple[str, bytes]:
    """(label, DER bytes) of the first PEM block."""
    lines = [line.strip() for line in pem.replace("\\n", "\n").strip().splitlines() if line.strip()]
    if len(lines) < 3 or not lines[0].startswith("-----BEGIN ") or not lines[-1].startswith("-----END "):
        raise InvalidServiceAccount("private_key: expected a PEM block (-----BEGIN PRIVATE KEY----- ...)")
    label = lines[0][len("-----BEGIN "):].rstrip("-").strip()
    end = next(i for i, line in enumerate(lines) if line.startswith("-----END "))
    try:
        return label, base64.b64decode("".join(lines[1:end]), validate=True)
    except ValueError:
        raise InvalidServiceAccount("private_key: the PEM body is not base64") from None


class RSAPrivateKey:
    __slots__ = ("n", "e", "d", "p", "q", "dp", "dq", "qinv", "size")

    def __init__(self, numbers: list[int]) -> None:
        self.n, self.e, self.d, self.p, self.q, self.dp, self.dq, self.qinv = numbers
        self.size = (self.n.bit_length() + 7) // 8

    @classmethod
    def from_pem(cls, pem: str) -> RSAPrivateKey:
        label, der = _pem_der(pem)
        if label == "PRIVATE KEY":  # PKCS#8: version, AlgorithmIdentifier, OCTET STRING (PKCS#1 key)
            items = _der_sequence(der)
            if len(items) < 3 or items[1][0] != 0x30 or items[2][0] != 0x04:
                raise InvalidServiceAccount("private_key: not a PKCS#8 private key")
            algorithm = _der_sequence(der_wrap(items[1][1]))
            if not algorithm or algorithm[0] != (0x06, _RSA_OID):
                raise InvalidServiceAccount("private_key: not an RSA key")
            der = items[2][1]
        elif label != "RSA PRIVATE KEY":
            raise InvalidServiceAccount(f"private_key: unsupported PEM type {label!r}")
        items = _der_sequence(der)  # PKCS#1: version, n, e, d, p, q, dp, dq, qinv
        if len(items) < 9 or any(tag != 0x02 for tag, _ in items[:9]):
            raise InvalidServiceAccount("private_key: not a PKCS#1 RSA private key")
        numbers = [int.from_bytes(value, "big") for _, value in items[1:9]]
        key = cls(numbers)
        if key.n.bit_length() < 1024 or key.p * key.q != key.n:
            raise InvalidServiceAccount("private_key: inconsistent RSA key")
        return key

    def sign_sha256(self, message: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 8.2.1)."""
        digest_info = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        padding = self.size - len(digest_info) - 3
        if padding < 8:
            raise InvalidServiceAccount("private_key: RSA key too short")
        m = int.from_bytes(b"\x00\x01" + b"\xff" * padding + b"\x00" + digest_info, "big")
        m1, m2 = pow(m, self.dp, self.p), pow(m, self.dq, self.q)  # CRT
        s = m2 + self.q * ((self.qinv * (m1 - m2)) % self.p)
        return s.to_bytes(self.size, "big")


def der_wrap(content: bytes) -> bytes:
    """A SEQUENCE around already-encoded content (to reuse _der_sequence on a nested one)."""
    length = len(content)
    if length < 0x80:
        return b"\x30" + bytes([length]) + content
    size = (length.bit_length() + 7) // 8
    return b"\x30" + bytes([0x80 | size]) + length.to_bytes(size, "big") + content


# -- service account -------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ServiceAccount:
    __slots__ = ("email", "token_uri", "project_id", "key", "cache_key")

    def __init__(self, email: str, token_uri: str, project_id: str | None, key: RSAPrivateKey, cache_key: str) -> None:
        self.email = email
        self.token_uri = token_uri
        self.project_id = project_id
        self.key = key
        self.cache_key = cache_key

    @classmethod
    def parse(cls, value: Any) -> ServiceAccount:
        """From a service-account JSON object, or its JSON text."""
        if isinstance(value, (str, bytes)):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise InvalidServiceAccount("expected a service-account JSON object (or its JSON text)") from None
        if not isinstance(value, dict):
            raise InvalidServiceAccount("expected a service-account JSON object (or its JSON text)")
        kind = value.get("type")
        if kind is not None and kind != "service_account":
            raise InvalidServiceAccount(f"type: expected 'service_account', got {kind!r}")
        email, pem = value.get("client_email"), value.get("private_key")
        if not isinstance(email, str) or not email:
            raise InvalidServiceAccount("client_email: required")
        if not isinstance(pem, str) or not pem:
            raise InvalidServiceAccount("private_key: required")
        token_uri = value.get("token_uri") or DEFAULT_TOKEN_URI
        if not isinstance(token_uri, str) or urlsplit(token_uri).scheme not in ("http", "https"):
            raise InvalidServiceAccount("token_uri: expected an http(s) URL")
        project = value.get("project_id")
        cache_key = hashlib.sha256(f"{email}\0{token_uri}\0{pem}".encode()).hexdigest()
        return cls(email, token_uri, project if isinstance(project, str) and project else None,
                   RSAPrivateKey.from_pem(pem), cache_key)

    def assertion(self, now: int) -> str:
        """The signed JWT for the token request."""
        header = b64url(orjson.dumps({"alg": "RS256", "typ": "JWT"}))
        claims = b64url(orjson.dumps({"iss": self.email, "scope": SCOPE, "aud": self.token_uri,
                                      "iat": now, "exp": now + JWT_LIFETIME}))
        signing_input = f"{header}.{claims}"
        return f"{signing_input}.{b64url(self.key.sign_sha256(signing_input.encode()))}"


# -- tokens ------------------------------------------------------------------------------------


class TokenError(GatewayError):
    """The token endpoint did not give an access token: a 502 naming the provider (never the key)."""

    status = 502


class TokenCache:
    """Access tokens per service account; one refresh at a time per account."""

    def __init__(self, upstream: UpstreamClient, connect_timeout: float = 10.0, read_timeout: float = 30.0) -> None:
        self.upstream = upstream
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._tokens: dict[str, tuple[str, float]] = {}  # cache key -> (token, monotonic expiry)
        self._refreshing: dict[str, asyncio.Future[str]] = {}
        self.refreshes = 0

    async def token(self, provider: str, account: ServiceAccount, egress: str | None = None) -> str:
        """`egress`: the account is a caller's, its token_uri checked by the egress policy (the field)."""
        cached = self._tokens.get(account.cache_key)
        if cached is not None and time.monotonic() < cached[1] - REFRESH_MARGIN:
            return cached[0]
        pending = self._refreshing.get(account.cache_key)
        if pending is None:
            pending = asyncio.ensure_future(self._refresh(provider, account, egress))
            self._refreshing[account.cache_key] = pending
            pending.add_done_callback(lambda _f: self._refreshing.pop(account.cache_key, None))
        return await asyncio.shield(pending)  # one caller leaving does not cancel the others' refresh

    async def _refresh(self, provider: str, account: ServiceAccount, egress: str | None = None) -> str:
        self.refreshes += 1
        body = urlencode({"grant_type": GRANT_TYPE, "assertion": account.assertion(int(time.time()))}).encode()
        started = time.monotonic()
        try:
            response = await self.upstream.post(
                f"{provider}:oauth", account.token_uri,
                {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}, body,
                connect_timeout=self.connect_timeout, read_timeout=self.read_timeout, stream=False,
                max_connections=10, egress=egress,
            )
            raw = await response.read()
        except EgressDenied:
            raise
        except GatewayError as exc:
            raise TokenError(f"Provider '{provider}': could not get a Google access token: {exc.detail}") from None
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        if response.status >= 400 or not isinstance(data, dict) or not isinstance(data.get("access_token"), str):
            reason = ""
            if isinstance(data, dict):
                error, description = data.get("error"), data.get("error_description")
                parts = [p for p in (error, description) if isinstance(p, str) and p]
                reason = ": " + ": ".join(parts)[:300] if parts else ""
            raise TokenError(
                f"Provider '{provider}': the Google token endpoint {_origin_path(account.token_uri)} refused the "
                f"service account {account.email} (HTTP {response.status}{reason})"
            )
        expires_in = data.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, (int, float)) and expires_in > 0 else JWT_LIFETIME
        token = data["access_token"]
        if not token or any(c in token for c in "\r\n\0"):
            raise UpstreamUnavailable(f"Provider '{provider}': the Google token endpoint sent an unusable token")
        if len(self._tokens) >= 10_000:
            self._tokens.clear()
        self._tokens[account.cache_key] = (token, started + lifetime)
        return token


def _origin_path(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
