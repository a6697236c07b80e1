"""Reading a chat completion request: validate the fields the gateway interprets, keep everything else as sent.

The client's body is forwarded as it came, except for `model` (the catalog's id), `stream_options.include_usage`
(always asked of the upstream when streaming, so every stream is billed from real usage) and, when the balance
only affords a smaller answer, the output limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import invalid

_OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens")
_MAX_CHOICES = 128


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]
    model: str
    messages: list[Any]
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_output_tokens: int | None  # per choice, as the client limited it
    n: int
    user: str | None
    tools: Any


def _positive_int(body: dict[str, Any], name: str, *, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer", name)
    if value <= 0:
        raise invalid(f"{name} must be greater than 0", name)
    if high is not None and value > high:
        raise invalid(f"{name} must be at most {high}", name)
    return value


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages is required", "messages")
    if not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", "messages")
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object", where)
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise invalid(f"{where}.role is required and must be a string", f"{where}.role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"{where}.content must be a string or an array of content parts", f"{where}.content")
    return messages


def parse_chat(body: dict[str, Any]) -> ChatRequest:
    """Validate `body`; raises a 400 ApiError naming the first bad field."""
    model = body.get("model")
    if model is None:
        raise invalid("model is required", "model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model must be a non-empty string", "model")
    messages = _messages(body)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object", "stream_options")
        flag = options.get("include_usage", False)
        if not isinstance(flag, bool):
            raise invalid("stream_options.include_usage must be a boolean", "stream_options.include_usage")
        include_usage = flag
    limits = [v for v in (_positive_int(body, name) for name in _OUTPUT_LIMITS) if v is not None]
    n = _positive_int(body, "n", high=_MAX_CHOICES) or 1
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise invalid("tools must be an array", "tools")
    return ChatRequest(
        body=body, model=model.strip(), messages=messages, stream=stream, include_usage=include_usage,
        max_output_tokens=min(limits) if limits else None, n=n, user=user, tools=tools,
    )


def upstream_body(chat: ChatRequest, *, model_id: str, output_cap: int | None) -> dict[str, Any]:
    """The body to forward: the client's, with the catalog model id, usage always asked for when streaming,
    and the output limit lowered to `output_cap` when the balance affords no more."""
    body = dict(chat.body)
    body["model"] = model_id
    if chat.stream:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    if output_cap is not None:
        present = [name for name in _OUTPUT_LIMITS if body.get(name) is not None]
        for name in present or ["max_tokens"]:
            body[name] = output_cap
    return body
