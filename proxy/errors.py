"""Gateway errors and their `{"detail": ...}` bodies (spec section 7.1)."""

from __future__ import annotations

from typing import Any

import orjson

INVALID_KEY = (
    "Your API key is invalid or expired, please check your API key at "
    "https://platform.respan.ai/platform/api/api-keys"
)


class GatewayError(Exception):
    """An error the gateway itself answers. `detail` never contains a secret."""

    status: int = 500

    def __init__(self, detail: str, status: int | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> bytes:
        return orjson.dumps({"detail": self.detail, **self.extra})


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401

    def __init__(self, detail: str = INVALID_KEY) -> None:
        super().__init__(detail)


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class PayloadTooLarge(GatewayError):
    status = 413


class ValidationFailed(GatewayError):
    """422 `{"detail": "Validation error", "errors": {field: [message]}}`."""

    status = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__("Validation error", errors={field: [message]})
        self.field = field


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"Requested model {model} is not available in the model list")


class UpstreamUnavailable(GatewayError):
    """The provider could not be reached (refused, reset, DNS): 502."""

    status = 502


class UpstreamTimeout(GatewayError):
    status = 504


class InternalError(GatewayError):
    status = 500

    def __init__(self) -> None:
        super().__init__("Internal server error", error_code="INTERNAL_ERROR")
