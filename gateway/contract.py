"""What each route promises its clients, declared beside its handler: `@operation(...)` names its summary, request
body, query parameters, answer and the errors it may give, and gateway.openapi turns those declarations and the
app's route table into the OpenAPI document. A route without one stops the app's start (and its tests).

Security, path parameters and the errors every route shares (authentication, rate limits, an outage of the
database, a NUL in the path, an oversized body) are not declared: they follow from how the route is served (its
sub-app's middleware, `requires_key`, its path, whether it reads a body), so they cannot be forgotten. Only a
handler that checks credentials itself names its scheme (`security=`).

Documenting a new route is one decorator above its handler, e.g.::

    @operation("Prometheus metrics", answer=Answer(media=("text/plain",)), database=False, security="adminToken")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

from gateway.params import Param
from gateway.settings import Settings

H = TypeVar("H", bound=Callable[..., Any])

# A request body's JSON Schema built from the app's settings (a chat's `n` limit, the configured image models):
# the schemas of bodies a handler checks field by field come from the same tables it checks them with.
SchemaOf = Callable[[Settings], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Failure:
    """One error answer: its status, its `error.code`, when it happens, and the headers it carries."""

    status: int
    code: str
    when: str
    headers: tuple[str, ...] = ()


# The errors routes declare (the shared ones are added by gateway.openapi). Codes are gateway.errors' and the
# handlers'; tests/test_contract_fuzz.py runs schemathesis against a live server to find any other status.
INVALID = Failure(400, "INVALID_REQUEST", "The request is malformed; `param` names the field")
UNAUTHENTICATED = Failure(401, "AUTHENTICATION_FAILED", "The credentials are missing, unknown or revoked")
INSUFFICIENT_BALANCE = Failure(402, "INSUFFICIENT_BALANCE", "The available balance cannot cover the call's hold; "
                               "`required_micros` and `available_micros` say by how much")
KEY_LIMIT = Failure(402, "KEY_LIMIT_EXCEEDED", "The key's spend limit for its window cannot cover the call's hold")
NOT_FOUND = Failure(404, "NOT_FOUND", "No such object (or it belongs to another account)")
NO_ROUTE = Failure(404, "NOT_FOUND", "No route matches the path (a path parameter holding a / or a line break)")
MODEL_NOT_FOUND = Failure(404, "MODEL_NOT_FOUND", "The model does not exist or is not priced")
CONVERSATION_NOT_FOUND = Failure(404, "CONVERSATION_NOT_FOUND", "No such stored conversation for this key")
MEMORY_NOT_FOUND = Failure(404, "MEMORY_NOT_FOUND", "No such memory for this key")
CONFLICT = Failure(409, "CONFLICT", "The request id was already used")
VIDEO_NOT_READY = Failure(409, "VIDEO_NOT_READY", "The video has not completed yet")
TOO_LARGE = Failure(413, "REQUEST_TOO_LARGE", "The body is larger than the gateway accepts")
IDEMPOTENCY_CONFLICT = Failure(422, "IDEMPOTENCY_CONFLICT",
                               "The Idempotency-Key was used before with a different request")
RATE_LIMITED = Failure(429, "RATE_LIMITED", "The key's requests-per-minute or per-day limit is reached; retry "
                       "after Retry-After seconds", headers=("Retry-After",))
UPSTREAM_RATE_LIMITED = Failure(429, "RATE_LIMITED", "The upstream is rate limiting requests; retry later")
UPSTREAM_ERROR = Failure(502, "UPSTREAM_ERROR", "The upstream failed, timed out or answered malformed; nothing is "
                         "charged")
ALL_PROVIDERS_EXHAUSTED = Failure(502, "ALL_PROVIDERS_EXHAUSTED", "Every provider of a model with several failed "
                                  "(or is being skipped after repeated failures: then with Retry-After); nothing is "
                                  "charged", headers=("Retry-After",))
UPSTREAM_NOT_CONFIGURED = Failure(503, "UPSTREAM_NOT_CONFIGURED",
                                  "The model's upstream is not configured on this gateway; nothing is held")
DATABASE_UNAVAILABLE = Failure(503, "SERVICE_UNAVAILABLE", "The database is not answering; retry after "
                               "Retry-After seconds", headers=("Retry-After",))

# What every billed upstream call may answer besides its own validation.
UPSTREAM_CALL = (INSUFFICIENT_BALANCE, KEY_LIMIT, MODEL_NOT_FOUND, UPSTREAM_RATE_LIMITED, UPSTREAM_ERROR,
                 ALL_PROVIDERS_EXHAUSTED, UPSTREAM_NOT_CONFIGURED)
# The headers naming who served a billed call (gateway.failover).
PROVIDER_HEADERS = {"X-Meterline-Provider": "The provider that served the call (a model's upstream, or the one of "
                                            "its providers that did)",
                    "X-Meterline-Model": "The model id that provider was sent"}


@dataclass(frozen=True, slots=True)
class Body:
    """A request body: a pydantic model the handler validates with, or a schema built from the handler's tables.
    `media` is its content types; `required` False for a body that may be left out."""


    schema: type[BaseModel] | SchemaOf
    media: tuple[str, ...] = ("application/json",)
    required: bool = True
    multipart: SchemaOf | None = None  # the schema of the same request sent as multipart/form-data, if it may be


@dataclass(frozen=True, slots=True)
class Answer:
    """The success answer: its status, a pydantic model of its JSON shape (None: no published shape), its content
    types and the headers it always carries."""

    model: type[BaseModel] | tuple[type[BaseModel], ...] | None = None  # a tuple: any one of them
    status: int = 200
    media: tuple[str, ...] = ("application/json",)
    headers: Mapping[str, str] = field(default_factory=dict)
    description: str = "OK"


@dataclass(frozen=True, slots=True)
class Operation:
    summary: str
    body: Body | None = None
    query: tuple[Param, ...] = ()
    headers: tuple[Param, ...] = ()
    path: tuple[Param, ...] = ()  # path parameters with more to say than "a string"
    answers: tuple[Answer, ...] = (Answer(),)
    errors: tuple[Failure, ...] = ()
    database: bool = True  # it reads the database, so an outage answers 503 with Retry-After
    # For a handler that checks credentials itself ("adminToken" or "customerKey"); routes of the admin sub-app
    # and `requires_key` handlers need not say it.
    security: str | None = None


_ATTRIBUTE = "__meterline_operation__"


def operation(summary: str, *, body: Body | type[BaseModel] | None = None, query: tuple[Param, ...] = (),
              headers: tuple[Param, ...] = (), path: tuple[Param, ...] = (),
              answer: Answer | type[BaseModel] | tuple[Answer, ...] | None = None,
              errors: tuple[Failure, ...] = (), database: bool = True,
              security: str | None = None) -> Callable[[H], H]:
    """Declare a handler's contract. The handler is returned unchanged (the declaration rides on it, and on any
    wrapper functools.wraps makes of it, so it works above or below `requires_key`)."""
    declared = Operation(
        summary=summary,
        body=Body(body) if isinstance(body, type) else body,
        query=query, headers=headers, path=path,
        answers=(Answer(answer),) if isinstance(answer, type) else (answer,) if isinstance(answer, Answer)
        else answer or (Answer(),),
        errors=errors, database=database, security=security,
    )

    def attach(handler: H) -> H:
        handler.__dict__[_ATTRIBUTE] = declared
        return handler

    return attach


def declared(handler: Callable[..., Any]) -> Operation | None:
    found = getattr(handler, _ATTRIBUTE, None)
    return found if isinstance(found, Operation) else None
