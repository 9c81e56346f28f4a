"""The error tree, and its one mapping to an HTTP status and the OpenAI error envelope.

Every failure a client can see is one of these classes. Each carries the HTTP status, the
OpenAI error ``type`` and an optional ``code`` and ``param``, so the web layer maps them in
exactly one place (:func:`envelope`) and never classifies errors by their text.

Messages name the parameter and the limit, never the submitted value: a value may be
patient text, and error bodies end up in client logs.

    MedserveError                      500 server_error
    ├── InvalidRequestError            400 invalid_request_error   (param=...)
    │   ├── ContextLengthError         400                         code=context_length_exceeded
    │   └── UnsupportedParameterError  400                         code=unsupported_parameter
    ├── AuthenticationError            401 invalid_request_error   code=invalid_api_key (...)
    ├── PermissionDeniedError          403 invalid_request_error   code=model_not_permitted (...)
    ├── NotFoundError                  404 invalid_request_error   code=not_found
    │   └── ModelNotFoundError         404                         code=model_not_found
    ├── MethodNotAllowedError          405 invalid_request_error
    ├── BodyTimeoutError               408 invalid_request_error   code=body_timeout (closes)
    ├── RequestTooLargeError           413 invalid_request_error   code=request_too_large
    ├── UnsupportedMediaTypeError      415 invalid_request_error   code=unsupported_media_type
    ├── RateLimitError                 429 requests                code=rate_limit_exceeded
    ├── UnavailableError               503 server_error            (Retry-After)
    │   └── OverloadedError            503                         code=overloaded
    ├── EngineError                    500 server_error            code=engine_error
    └── RequestTimeoutError            504 server_error            code=timeout

Outside the tree, never a client's answer: :class:`ConfigError`, the operator's
configuration or model registry is unusable (``medserve serve`` refuses to start).
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class ConfigError(Exception):
    """The configuration or the model registry is unusable; the message says what to fix.

    Raised at start-up (settings, registry files, engine specs, weights files), reported to
    the operator, never mapped to an HTTP answer.
    """


class MedserveError(Exception):
    """Base of every error medserve reports; unexpected failures map to a plain 500."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        # Tokens of a rendered prompt this failed request cost (set by the engine that
        # tokenized it before refusing): the web layer charges them to the key's rate limit.
        self.prompt_tokens: int | None = None


class InvalidRequestError(MedserveError):
    """The request is malformed or asks for something out of range; ``param`` names the field."""

    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion does not fit in the model's context window."""

    default_code = "context_length_exceeded"


class UnsupportedParameterError(InvalidRequestError):
    """An OpenAI parameter medserve understands but does not implement (tools, logprobs, n>1)."""

    default_code = "unsupported_parameter"


class AuthenticationError(MedserveError):
    """No usable API key: missing, malformed, unknown, revoked or expired (``code`` says).

    ``key_id``: the key's id when the key was identified (its secret matched) but is not
    usable (revoked, expired), for the refusal's audit record; None otherwise (an id
    whose secret did not match is only a claim). Never the secret.
    """

    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None, key_id: str | None = None) -> None:
        super().__init__(message, code=code)
        self.key_id = key_id


class PermissionDeniedError(MedserveError):
    """The key is valid but may not do this: another model, or an operation of its role."""

    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class RateLimitError(MedserveError):
    """The key's requests or tokens per minute are spent; ``retry_after`` says when to retry."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class NotFoundError(MedserveError):
    """No such route or resource."""

    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    """The requested model id is not served here. Never answered by a substitute model."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        # A model id is an identifier chosen by the operator, not patient text, but the
        # client can put anything in it: keep it out of the message all the same.
        super().__init__(
            "The requested model does not exist on this server; GET /v1/models lists the "
            "models it serves.",
            param="model",
        )
        self.model = model


class MethodNotAllowedError(MedserveError):
    """The route exists but not for this HTTP method."""

    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class BodyTimeoutError(MedserveError):
    """The request body stalled: not all of it arrived within the body timeout.

    The connection is closed after the answer: the rest of the body may still be coming.
    """

    status = 408
    type = "invalid_request_error"
    default_code = "body_timeout"


class RequestTooLargeError(MedserveError):
    """The request body is larger than the configured limit."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaTypeError(MedserveError):
    """The body is in an encoding medserve does not read (a compressed Content-Encoding)."""

    status = 415
    type = "invalid_request_error"
    default_code = "unsupported_media_type"


class UnavailableError(MedserveError):
    """The server cannot take the request now (model still loading, shutting down)."""

    status = 503
    type = "server_error"
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5, **kwargs: Any) -> None:
        super().__init__(message, retry_after=retry_after, **kwargs)


class OverloadedError(UnavailableError):
    """Every slot and the wait queue are full; the client should retry later."""

    default_code = "overloaded"


class EngineError(MedserveError):
    """The inference engine failed while generating. Not the client's fault."""

    default_code = "engine_error"


class RequestTimeoutError(MedserveError):
    """The request did not finish within the model's time limit; its slot was freed."""

    status = 504
    default_code = "timeout"

    def __init__(self, message: str = "The request took longer than this server allows.") -> None:
        super().__init__(message)


def envelope(error: MedserveError) -> dict[str, Any]:
    """The OpenAI error body for ``error``: ``{"error": {message, type, param, code}}``."""
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


def headers(error: MedserveError) -> dict[str, str]:
    """Extra response headers for ``error``: ``Retry-After`` (429, 503), the
    ``WWW-Authenticate`` challenge that RFC 9110 requires with a 401, and
    ``Connection: close`` after a stalled body (408)."""
    out = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    if error.status == 401:
        out["WWW-Authenticate"] = 'Bearer realm="medserve"'
    if isinstance(error, BodyTimeoutError):
        out["Connection"] = "close"
    return out


def unusable_file(exc: OSError, what: str, path: object) -> str:
    """One line for a file the user named that cannot be used: ``what``, the path, the
    system's reason and the fix (a permission problem: the user, owner or mode)."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = (
            "run as a user that may use it (the server's: `runuser -u medserve -- medserve "
            "...`; in a container: `podman exec`, or a service that mounts it), or change "
            "its owner or mode"
        )
    else:
        fix = "check the path"
    return f"cannot use the {what} {path}: {reason}; {fix}"
