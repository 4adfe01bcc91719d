"""What a request says about where it came from, read only where it can be trusted.

Behind a load balancer every connection comes from the balancer: the client's address is in
X-Forwarded-For, which anyone can also send. So the header is read only when the connection comes
from one of `server.trusted_proxies`, and then from the right: each trusted proxy appends the
address it saw, so the first address from the right that is not itself a trusted proxy is the
client (what the client wrote itself is further left, and ignored).

A request id sent by the balancer or the client (X-Request-Id) becomes the gateway's request id,
so the balancer's access log, the gateway's log and the response header name the request alike.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")  # printable and short: it goes into logs and headers
_REMEMBERED = 4096  # peer addresses whose trust is remembered (a balancer has few)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Sequence[str]) -> list[Network]:
    """`10.0.0.0/8`, `192.168.1.7`, `::1`... -> networks; ValueError names the entry that is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{entry!r} is not an IP address or network (CIDR)") from None
    return networks


class ClientAddress:
    """The client's IP address for the log, given the connection's peer and the request headers."""

    def __init__(self, trusted_proxies: Sequence[str]) -> None:
        self.networks = parse_networks(trusted_proxies)
        self._trusted: dict[str, bool] = {}

    def trusts(self, address: str) -> bool:
        known = self._trusted.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                known = False
            else:
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 on a dual-stack socket is 10.0.0.1
                known = any(ip in network for network in self.networks)
            if len(self._trusted) < _REMEMBERED:
                self._trusted[address] = known
        return known

    def of(self, peer: str | None, headers: Mapping[str, str]) -> str | None:
        if not self.networks or peer is None or not self.trusts(peer):
            return peer  # the usual case without proxies: no header is read
        forwarded = headers.get("x-forwarded-for")
        if not forwarded:
            return peer
        client = peer
        for hop in reversed(forwarded.split(",")):
            hop = hop.strip()
            if not _is_ip(hop):
                break  # garbled: keep the last address a trusted proxy vouched for
            client = hop
            if not self.trusts(hop):
                break
        return client


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def request_id(headers: Mapping[str, str]) -> str | None:
    """The X-Request-Id the request carries, when it is one we can log and echo safely."""
    value = headers.get("x-request-id")
    if value is None or REQUEST_ID.fullmatch(value) is None:
        return None
    return value
