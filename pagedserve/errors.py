"""One exception hierarchy for the whole package.

The server maps each class to an OpenAI error JSON with the status given here;
the CLI prints the message as one line. Messages name the offending field and
say what would be accepted, so users can fix the call without reading code.
"""
from __future__ import annotations


class PagedServeError(Exception):
    """Base class. `status` is the HTTP status the server answers with."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, param: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class InvalidRequestError(PagedServeError, ValueError):
    """A request field is out of range or of the wrong kind (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class PromptTooLongError(InvalidRequestError):
    """Prompt (+ max_tokens) exceeds max_model_len (HTTP 400)."""


class ModelNotFoundError(PagedServeError):
    status = 404
    type = "not_found_error"


class QueueFullError(PagedServeError):
    status = 429
    type = "rate_limit_error"


class NotReadyError(PagedServeError):
    status = 503
    type = "service_unavailable"


class RequestFailedError(PagedServeError):
    """The engine hit an internal error while running this one request and aborted it (HTTP 500);
    the other requests in the batch were not affected."""

    status = 500
    type = "internal_error"


class ConfigError(PagedServeError, ValueError):
    """Engine/server configuration that cannot work (bad path, too little memory...)."""

    status = 500
    type = "config_error"


class UnsupportedModelError(ConfigError):
    pass


class OutOfMemoryError(ConfigError):
    pass
