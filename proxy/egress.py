"""Egress policy: where a base URL that is not the operator's may send the gateway.

Tenant-supplied URLs (a request's `customer_credentials` / `credential_override` / load-balance
`api_base`, providers created through the admin API, a tenant service account's `token_uri`) are
checked twice: when the request arrives (`check_url`: scheme, user info, a literal address or a
denied host name, named by field) and when the connection opens (`check_address` on every address
the host name resolves to, so DNS rebinding to 169.254.169.254 is refused; the connection then
goes to the checked address). Providers of the config file are trusted and never checked.

Refused by default: loopback, link-local (169.254.0.0/16 with the cloud metadata services,
fe80::/10), private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7), unspecified,
multicast, reserved and benchmarking ranges, and metadata host names. IPv4 addresses inside IPv6
(::ffff:a.b.c.d, ::a.b.c.d, 6to4, NAT64) are checked as the IPv4 address they carry.

Config (`egress:`): `allow` (CIDRs, addresses or host names; `.example.com` or `*.example.com`
for a suffix) lets through what the built-in list refuses; `deny` (same shapes) refuses more and
wins over `allow`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from proxy.errors import ValidationFailed

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "an unspecified address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address (cloud metadata)"),
    ("10.0.0.0/8", "a private address"),
    ("172.16.0.0/12", "a private address"),
    ("192.168.0.0/16", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("192.0.0.0/24", "a reserved address"),
    ("198.18.0.0/15", "a reserved (benchmarking) address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("fc00::/7", "a private (unique local) address"),
    ("ff00::/8", "a multicast address"),
)
DEFAULT_DENY_HOSTS: tuple[str, ...] = (
    "localhost", ".localhost", "metadata", "metadata.google.internal", "metadata.goog",
    "instance-data", "instance-data.ec2.internal",
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT = ipaddress.IPv6Network("::/96")
_HOST = re.compile(r"^(?:\*?\.)?[a-z0-9_]([a-z0-9_-]{0,62})(?:\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$")
_NUMERIC = re.compile(r"^[0-9a-fx.]+$")


class EgressDenied(ValidationFailed):
    """422 naming the field whose URL the policy refuses, and why (never the URL's path or query)."""


def literal_ip(host: str) -> IP | None:
    """The address a URL host names literally: dotted quads, IPv6 (brackets already gone), and the
    decimal / octal / hex IPv4 forms getaddrinfo also accepts (2852039166, 0251.0376.0251.0376)."""
    host = host.strip("[]").lower().rstrip(".")  # "169.254.169.254." may resolve as without the dot
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        pass
    if _NUMERIC.match(host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _embedded(ip: IP) -> ipaddress.IPv4Address | None:
    if ip.version != 6:
        return None
    assert isinstance(ip, ipaddress.IPv6Address)
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _COMPAT and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _parse_entries(entries: Iterable[str], field: str) -> tuple[list[Net], list[str]]:
    nets: list[Net] = []
    hosts: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, str) or not entry.strip():
            raise ValueError(f"{field}[{i}]: expected a CIDR, an IP address or a host name, got {entry!r}")
        text = entry.strip().lower()
        try:
            nets.append(ipaddress.ip_network(text.strip("[]"), strict=False))
            continue
        except ValueError:
            pass
        if "/" in text or ":" in text or not _HOST.match(text):
            raise ValueError(f"{field}[{i}]: {entry!r} is neither a CIDR, an IP address nor a host name "
                             "(use '.example.com' or '*.example.com' for a domain and its subdomains)")
        hosts.append(text.removeprefix("*").rstrip("."))
    return nets, hosts


def _host_matches(host: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("."):
            if host.endswith(pattern) or host == pattern[1:]:
                return True
        elif host == pattern:
            return True
    return False


class EgressPolicy:
    """The built-in deny list plus the config's `egress.allow` / `egress.deny`."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = (), where: str = "egress") -> None:
        self.allow_nets, self.allow_hosts = _parse_entries(allow, f"{where}.allow")
        deny_nets, deny_hosts = _parse_entries(deny, f"{where}.deny")
        self.default_nets = [(ipaddress.ip_network(cidr), reason) for cidr, reason in DEFAULT_DENY]
        self.deny_nets = deny_nets
        self.deny_hosts = deny_hosts
        self.default_hosts = list(DEFAULT_DENY_HOSTS)

    # -- the checks: None when allowed, else the reason ----------------------------------------

    def host_allowed_by_name(self, host: str) -> bool:
        """An `allow` host name lets its connections through whatever it resolves to."""
        return bool(self.allow_hosts) and _host_matches(host.lower().rstrip("."), self.allow_hosts)

    def host_reason(self, host: str) -> str | None:
        host = host.lower().rstrip(".")
        if _host_matches(host, self.deny_hosts):
            return f"host {host} is in egress.deny"
        if _host_matches(host, self.default_hosts) and not self.host_allowed_by_name(host):
            return f"host {host} is a local or cloud metadata host name"
        return None

    def address_reason(self, ip: IP) -> str | None:
        embedded = _embedded(ip)
        candidates = (ip, embedded) if embedded is not None else (ip,)
        for candidate in candidates:
            if any(candidate in net for net in self.deny_nets if net.version == candidate.version):
                return f"{candidate} is in egress.deny"
        for candidate in candidates:
            if any(candidate in net for net in self.allow_nets if net.version == candidate.version):
                return None
        for candidate in candidates:
            for net, reason in self.default_nets:
                if net.version == candidate.version and candidate in net:
                    return f"{candidate} is {reason}"
        return None

    def url_reason(self, url: str) -> str | None:
        """Why a tenant URL is refused before any connection (None: it may be tried)."""
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            return "not a valid URL"
        if parts.scheme.lower() not in ("http", "https"):
            return "only http:// and https:// URLs are allowed"
        if "@" in parts.netloc:
            return "user info (user:password@) is not allowed in the URL; use api_key"
        host = parts.hostname
        if not host:
            return "the URL has no host"
        ip = literal_ip(host)
        if ip is not None:
            reason = self.address_reason(ip)
            return f"egress policy: {reason}" if reason else None
        reason = self.host_reason(host)
        return f"egress policy: {reason}" if reason else None

    def check_url(self, url: str, field: str) -> None:
        reason = self.url_reason(url)
        if reason is not None:
            raise EgressDenied(field, reason)


# -- header names and values a request or an admin call sets -------------------------------

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 field-name


def header_reason(name: object, value: object) -> str | None:
    """Why a header cannot be sent (None: it can): names must be RFC 9110 tokens, values free of
    CR, LF, NUL and other control characters except tab."""
    if not isinstance(name, str) or not _TOKEN.match(name):
        return "a header name must be letters, digits or !#$%&'*+-.^_`|~ (no spaces, colons or line breaks)"
    if not isinstance(value, str):
        return "a header value must be a string"
    if any((c < " " and c != "\t") or c == "\x7f" for c in value):
        return "a header value may not contain CR, LF, NUL or other control characters"
    return None
