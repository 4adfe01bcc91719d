"""What every wire-protocol module offers the core."""

from __future__ import annotations

from typing import Protocol

from proxy.call import Call, Reply, Target


class ProviderAdapter(Protocol):
    """Sends one attempt of a Call to its Target and answers in the client's format.

    A non-stream Reply carries the body bytes (an upstream error's own body and status pass
    through). A stream Reply carries an async iterator of SSE bytes; closing that iterator must
    close the upstream request at once, and a break after the first byte raises
    proxy.upstream.UpstreamStreamError.
    """

    async def send(self, call: Call, target: Target) -> Reply: ...

    async def close(self) -> None: ...
