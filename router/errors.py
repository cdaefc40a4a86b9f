"""APIError and the OpenAI / Anthropic error bodies the router returns.

OpenAI: {"error": {"message", "type", "param", "code"}}.
Anthropic: {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                   429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}


class APIError(Exception):
    """An error answered to the HTTP client with `status` in the API's own error format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def openai_error_body(err: APIError) -> dict:
    """The OpenAI error object for `err`."""
    kind = OPENAI_TYPES.get(err.status, "internal_server_error" if err.status >= 500 else "invalid_request_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def anthropic_error_body(err: APIError) -> dict:
    """The Anthropic error object for `err`."""
    kind = ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def is_anthropic_path(path: str) -> bool:
    """Anthropic endpoints answer errors in Anthropic's format; everything else in OpenAI's."""
    return path.startswith("/v1/messages")


def error_body(path: str, err: APIError) -> dict:
    """The error body in the format of the API that `path` belongs to."""
    return anthropic_error_body(err) if is_anthropic_path(path) else openai_error_body(err)


def validation_message(errors: list[dict]) -> str:
    """A short message from pydantic validation errors: `field.path: reason; ...`."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"
