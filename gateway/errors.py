"""OpenAI-shaped errors: `{"error": {"message", "type", "code", "param"}}`, with Lumenfall's codes.

`ApiError` is what handlers raise; `error_middleware` gives every request its id (`X-Request-Id` on every
response, errors included), renders ApiError, translates billing errors, a database outage (503 with
Retry-After), aiohttp's HTTP exceptions and malformed input, and turns anything unexpected into a logged 500 that
leaks no detail.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from billing import errors as billing_errors
from billing.accounts import new_id
from gateway import logs
from gateway.render import iso, json_response

log = logging.getLogger("meterline.errors")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Every request's id: the request record's and the hold's id on billed routes, and X-Request-Id on the response.
REQUEST_ID = web.RequestKey("request_id", str)
REQUEST_ID_HEADER = "X-Request-Id"
# A client's own X-Request-Id, kept as `client_request_id` on its record and log lines when it is an id: the
# characters of UUIDs, ULIDs, base64 and the usual prefixes ("req_", "trace:"), at most 128 of them. Anything else
# (spaces, quotes, control characters, a pasted secret's length) is ignored rather than refused: the header is
# the client's tracing aid, and no call should fail over it. Meterline's own id is still the one returned.
CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str)
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# What a client told to come back after a database outage waits: long enough not to hammer a restarting server,
# short enough that the OpenAI SDKs' retry (which honours Retry-After) rides out a restart.
RETRY_AFTER_SECONDS = 2


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type
        self.param = param
        self.extra = extra or {}
        self.headers = headers

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "code": self.code, "param": self.param}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> web.Response:
        response = json_response(self.body(), status=self.status, headers=self.headers)
        response[API_ERROR] = self  # what the metrics count a refusal by (gateway.access)
        return response


# The error a response renders, kept on the response for the code that observes it once it is answered.
API_ERROR = web.ResponseKey("api_error", ApiError)


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message, param=param)


def not_found(message: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", message)


def unauthenticated(message: str) -> ApiError:
    return ApiError(401, "AUTHENTICATION_FAILED", message, type="authentication_error")


def database_unavailable() -> ApiError:
    return ApiError(503, "SERVICE_UNAVAILABLE",
                    f"The service is temporarily unavailable (its database is not answering); retry in "
                    f"{RETRY_AFTER_SECONDS} seconds", type="server_error",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def from_validation(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    elif err["type"] == "missing":
        message = "is required"
    return invalid(f"{param}: {message}" if param else message, param)


def from_billing(exc: billing_errors.BillingError) -> ApiError:
    if isinstance(exc, billing_errors.InsufficientBalance):
        return ApiError(
            402, "INSUFFICIENT_BALANCE", str(exc), type="billing_error",
            extra={"required_micros": exc.required_micros, "available_micros": exc.available_micros},
        )
    if isinstance(exc, billing_errors.KeyLimitExceeded):
        return ApiError(
            402, "KEY_LIMIT_EXCEEDED", str(exc), type="billing_error",
            extra={"limit_micros": exc.limit_micros, "limit_remaining_micros": max(exc.remaining_micros, 0),
                   "limit_reset": exc.limit_reset,
                   "resets_at": iso(exc.resets_at) if exc.resets_at is not None else None},
        )
    if isinstance(exc, billing_errors.AccountNotFound | billing_errors.KeyNotFound | billing_errors.UnknownHold):
        return not_found(str(exc))
    if isinstance(exc, billing_errors.IdempotencyConflict):
        return ApiError(422, "IDEMPOTENCY_CONFLICT", str(exc))
    if isinstance(exc, billing_errors.DuplicateRequest):
        return ApiError(409, "CONFLICT", str(exc))
    return invalid(str(exc))


_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "REQUEST_TOO_LARGE"}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = new_id("req")
    client_id = request.headers.get(REQUEST_ID_HEADER)
    if client_id is not None and _CLIENT_REQUEST_ID.fullmatch(client_id):
        request[CLIENT_REQUEST_ID] = client_id
    else:
        client_id = None
    logs.start(request[REQUEST_ID], client_id)
    if "%00" in request.raw_path:
        # PostgreSQL text cannot hold NUL: refuse it here rather than let it reach a query as an id or filter.
        return invalid("The request path or query contains a NUL character (%00)").response()
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except billing_errors.DatabaseUnavailable:
        # Logged once per outage by billing.db's Health, not once per request.
        return database_unavailable().response()
    except billing_errors.BillingError as exc:
        return from_billing(exc).response()
    except ValidationError as exc:
        return from_validation(exc).response()
    except RecursionError:
        # JSON nested deeper than Python's recursion allows, in a body or in content we walk to count tokens.
        return invalid("The request is nested too deeply").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "INVALID_REQUEST")
        message = exc.reason if exc.status != 404 else f"No route for {request.method} {request.path}"
        return ApiError(exc.status, code, message, headers=_allow_header(exc)).response()
    except Exception:
        # The one place an unexpected error is caught: it is logged with its traceback and the client gets no
        # detail. CancelledError is a BaseException and passes through untouched.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return ApiError(500, "INTERNAL_ERROR", "Internal error", type="server_error").response()


def client_request_id(request: web.Request) -> str | None:
    """The client's own request id, when it sent a usable X-Request-Id."""
    return request.get(CLIENT_REQUEST_ID)


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
