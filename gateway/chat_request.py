"""Reading a chat completion request: every field is known and validated, and the body forwarded upstream is built
from the validated request, never from the raw one.

Each top-level field is one of:
- priced: `messages` and every other forwarded field carry text the upstream may bill as input, and all of it is
  in the prompt the hold is estimated on (tokens.Prompt); the output limit and `n` size the output allowance;
- forwarded as sent after a type check: sampling and routing options that cannot raise what a call costs
  (`temperature`, `stop`, `seed`, `reasoning`, `provider`, ...); their text is counted into the prompt all the same.
  The deprecated `reasoning_effort` is sent as `reasoning.effort` (as lumyx converts it), unless `reasoning` gives
  an effort of its own;
- refused with a 400 naming it: cost drivers Meterline does not price (`models` fallback lists, `route`,
  `plugins`, `web_search_options`, audio output, a `service_tier` other than auto/default), and any field it does
  not know, as OpenAI refuses an unrecognised argument.

Every field's check is a `Rule`, which also carries the JSON Schema that check enforces: the OpenAPI document's
request body is built from these same tables (`body_schema`), so the two cannot disagree.

Exactly one output limit reaches the upstream, always: the per-choice allowance the hold covers, under the name
the model wants (else the client's own choice of `max_tokens` or `max_completion_tokens`). When the client gives
both, the smaller is what it asked for; the other is not sent.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from billing import tokens
from gateway.errors import invalid

OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens")
MAX_USER_CHARS = 256
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
# Content parts Meterline prices: text, and images (held at tokens.IMAGE_PART_TOKENS each).
PART_TYPES = frozenset({"text", "image_url", "refusal"})
# The reasoning efforts `reasoning_effort` may name (those of OpenRouter's `reasoning.effort`).
EFFORTS = ("xhigh", "high", "medium", "low", "minimal", "none")

# The reason each unpriced cost driver is refused.
REFUSED = {
    "models": "fallback model lists are not supported: a call is priced and held for one model",
    "route": "routing across fallback models is not supported: a call is priced and held for one model",
    "plugins": "plugins (web search, file parsing) add input Meterline cannot price before the call",
    "web_search_options": "web search adds input and fees Meterline cannot price before the call",
    "audio": "audio output is not priced",
}


@dataclass(frozen=True, slots=True)
class Rule:
    """A field's check (raises a 400 naming it) and the JSON Schema of the values it accepts."""

    check: Callable[[str, Any], None]
    schema: dict[str, Any]


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{name} must be a number", name)


def _integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer", name)


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid(f"{name} must be a boolean", name)


def _string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name)


def _object(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise invalid(f"{name} must be an object", name)


def _strings(name: str, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(f"{name} must be an array of strings", name)


def _stop(name: str, value: Any) -> None:
    if not isinstance(value, str):
        _strings(name, value)


def _tier(name: str, value: Any) -> None:
    if value not in ("auto", "default"):
        raise invalid(f"{name} {value!r} is not supported: other service tiers are priced differently upstream "
                      "(only auto and default are accepted)", name)


def _modalities(name: str, value: Any) -> None:
    if value != ["text"]:
        raise invalid(f"{name} must be [\"text\"]: audio output is not priced", name)


def _reasoning(name: str, value: Any) -> None:
    _object(name, value)
    budget = value.get("max_tokens")
    if budget is not None:
        _integer(f"{name}.max_tokens", budget)


def _effort(name: str, value: Any) -> None:
    if not isinstance(value, str) or value not in EFFORTS:
        raise invalid(f"{name} must be one of {', '.join(EFFORTS)}", name)


def _array(name: str, value: Any) -> None:
    if not isinstance(value, list):
        raise invalid(f"{name} must be an array", name)


def _choice(name: str, value: Any) -> None:
    if not isinstance(value, str | dict):
        raise invalid(f"{name} must be a string or an object", name)


_INT64 = {"minimum": -(2**63), "maximum": 2**63 - 1}  # gateway.bodies refuses any integer beyond 64 bits
NUMBER = Rule(_number, {"type": "number"})
INTEGER = Rule(_integer, {"type": "integer", **_INT64})
BOOLEAN = Rule(_boolean, {"type": "boolean"})
STRING = Rule(_string, {"type": "string"})
OBJECT = Rule(_object, {"type": "object"})
ARRAY = Rule(_array, {"type": "array"})
STRINGS = Rule(_strings, {"type": "array", "items": {"type": "string"}})
CHOICE = Rule(_choice, {"type": ["string", "object"]})

# Fields forwarded as sent, with the rule each must pass. Those marked priced in the module docstring carry the
# text the upstream bills beyond the messages; every one of them is counted into the prompt.
_FORWARDED: dict[str, Rule] = {
    # input the upstream bills: tool and function definitions, JSON schemas, predicted output
    "tools": ARRAY, "functions": ARRAY, "tool_choice": CHOICE, "function_call": CHOICE,
    "response_format": OBJECT, "prediction": OBJECT,
    # sampling and output shape
    "temperature": NUMBER, "top_p": NUMBER, "top_k": NUMBER, "min_p": NUMBER, "top_a": NUMBER,
    "frequency_penalty": NUMBER, "presence_penalty": NUMBER, "repetition_penalty": NUMBER, "seed": INTEGER,
    "stop": Rule(_stop, {"anyOf": [STRING.schema, STRINGS.schema]}), "logit_bias": OBJECT, "logprobs": BOOLEAN,
    "top_logprobs": INTEGER, "parallel_tool_calls": BOOLEAN,
    "reasoning_effort": Rule(_effort, {"type": "string", "enum": list(EFFORTS)}), "verbosity": STRING,
    "reasoning": Rule(_reasoning, {"type": "object", "properties": {"max_tokens": INTEGER.schema}}),
    "modalities": Rule(_modalities, {"const": ["text"]}),
    "service_tier": Rule(_tier, {"type": "string", "enum": ["auto", "default"]}),
    # bookkeeping and routing that do not change the price a call is charged at
    "metadata": OBJECT, "store": BOOLEAN, "prompt_cache_key": STRING, "safety_identifier": STRING,
    "provider": OBJECT, "transforms": STRINGS, "usage": OBJECT,
}
# Meterline's own fields (lumyx's stateful chat): consumed here, never forwarded.
STATEFUL = ("conversation_id", "memory")


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: list[Any]
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    max_output_tokens: int | None  # per choice, as the client limited it (the smaller of its two fields)
    limit_field: str | None  # the field the client limited it with
    n: int
    user: str | None
    forwarded: dict[str, Any]  # the other fields, validated, sent as they came
    prompt: tokens.Prompt  # every forwarded text the upstream may bill as input
    conversation_id: uuid.UUID | None = None  # a stored conversation to continue
    memory: bool = False  # recall from the key's earlier conversations, and learn from this one

    def with_messages(self, messages: list[Any]) -> ChatRequest:
        """This request sending `messages` instead (history and memory added), its prompt recomputed."""
        return dataclasses.replace(self, messages=messages, prompt=tokens.Prompt.of(messages, self.forwarded or None))


def _positive(name: str, value: Any) -> None:
    _integer(name, value)
    if value <= 0:
        raise invalid(f"{name} must be greater than 0", name)


def _model(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"{name} must be a non-empty string", name)


def _user(name: str, value: Any) -> None:
    _string(name, value)
    if len(value) > MAX_USER_CHARS:
        raise invalid(f"{name} must be at most {MAX_USER_CHARS} characters", name)


def _conversation_id(name: str, value: Any) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        uuid.UUID(value)
    except ValueError:
        raise invalid(f"{name} must be the UUID of a stored conversation", name) from None


def _messages(name: str, messages: Any) -> None:
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
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
        if "audio" in message:
            raise invalid(f"{where}.audio: audio is not priced", f"{where}.audio")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid(f"{where}.content must be a string or an array of content parts", f"{where}.content")
        if isinstance(content, list):
            for number, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in PART_TYPES:
                    at = f"{where}.content.{number}.type"
                    raise invalid(f"{at} must be one of {', '.join(sorted(PART_TYPES))}: other content (audio, "
                                  f"files) is not priced", at)


_STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def _stream_options(where: str, options: Any) -> None:
    _object(where, options)
    for name, value in options.items():
        if name not in _STREAM_OPTIONS:
            raise invalid(f"Unrecognized request argument supplied: {where}.{name}", f"{where}.{name}")
        _boolean(f"{where}.{name}", value)


_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": sorted(ROLES)},
        "content": {"anyOf": [
            {"type": "string"}, {"type": "null"},
            {"type": "array", "items": {"type": "object", "required": ["type"],
                                        "properties": {"type": {"type": "string", "enum": sorted(PART_TYPES)}}}},
        ]},
    },
    "not": {"required": ["audio"]},  # audio input is not priced
}
# The forms uuid.UUID reads (hyphens, braces and a urn: prefix optional).
_UUID = r"^(?:urn:uuid:)?\{?[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\}?$"
_POSITIVE = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
# Meterline's own fields: `model` and `messages` are required; the rest may be left out or null.
_OWN: dict[str, Rule] = {
    "model": Rule(_model, {"type": "string", "pattern": r"\S"}),
    "messages": Rule(_messages, {"type": "array", "minItems": 1, "items": _MESSAGE}),
    "stream": BOOLEAN,
    "stream_options": Rule(_stream_options, {
        "type": "object", "additionalProperties": False,
        "properties": {name: BOOLEAN.schema for name in _STREAM_OPTIONS}}),
    "n": Rule(_positive, _POSITIVE),
    "user": Rule(_user, {"type": "string", "maxLength": MAX_USER_CHARS}),
    **{name: Rule(_positive, _POSITIVE) for name in OUTPUT_LIMITS},
    "conversation_id": Rule(_conversation_id, {"type": "string", "format": "uuid", "pattern": _UUID}),
    "memory": BOOLEAN,
}
_REQUIRED = ("model", "messages")


def body_schema(*, max_choices: int, models: list[str]) -> dict[str, Any]:
    """The JSON Schema of a chat completion request, from the rules `parse_chat` checks with: every known field,
    nothing else (a refused cost driver or an unknown field is a 400). `models` are shown as examples (any model
    of the catalog may be asked for)."""
    properties: dict[str, Any] = {}
    for name, rule in {**_OWN, **_FORWARDED}.items():
        schema = rule.schema
        if name == "n":
            schema = {**schema, "maximum": max_choices}
        elif name == "model" and models:
            schema = {**schema, "examples": models}
        properties[name] = schema if name in _REQUIRED else {"anyOf": [schema, {"type": "null"}]}
    refused = "; ".join(f"{name}: {why}" for name, why in REFUSED.items())
    return {"type": "object", "required": list(_REQUIRED), "properties": properties, "additionalProperties": False,
            "description": f"OpenAI's chat completion request. Refused with a 400: {refused}."}


def _effort_as_reasoning(forwarded: dict[str, Any]) -> None:
    """Move the deprecated `reasoning_effort` into `reasoning.effort`, where an effort `reasoning` already gives
    wins; `reasoning_effort` itself is not sent."""
    effort = forwarded.pop("reasoning_effort", None)
    reasoning = forwarded.get("reasoning") or {}
    if effort is not None and reasoning.get("effort") is None:
        forwarded["reasoning"] = {**reasoning, "effort": effort}


def parse_chat(body: dict[str, Any], *, max_choices: int) -> ChatRequest:
    """Validate `body`; raises a 400 ApiError naming the first bad field."""
    forwarded: dict[str, Any] = {}
    own: dict[str, Any] = {}
    for name, value in body.items():
        if name in REFUSED:
            raise invalid(f"{name} is not supported: {REFUSED[name]}", name)
        rule = _OWN.get(name)
        if rule is None:
            rule = _FORWARDED.get(name)
            if rule is None:
                raise invalid(f"Unrecognized request argument supplied: {name}", name)
        if value is not None:
            rule.check(name, value)
            (own if name in _OWN else forwarded)[name] = value
    _effort_as_reasoning(forwarded)
    for name in _REQUIRED:
        if name not in own:
            raise invalid(f"{name} is required", name)
    model: str = own["model"]
    messages: list[Any] = own["messages"]
    stream: bool = own.get("stream", False)
    include_usage = bool(own.get("stream_options", {}).get("include_usage", False))
    limits: dict[str, int] = {name: own[name] for name in OUTPUT_LIMITS if name in own}
    limit_field = min(limits, key=limits.__getitem__) if limits else None
    n: int = own.get("n", 1)
    if n > max_choices:
        raise invalid(f"n must be at most {max_choices}", "n")
    user: str | None = own.get("user")
    if user is not None:
        forwarded["user"] = user
    raw_id = own.get("conversation_id")
    conversation_id = uuid.UUID(raw_id) if raw_id is not None else None
    memory: bool = own.get("memory", False)
    return ChatRequest(
        model=model.strip(), messages=messages, stream=stream, include_usage=include_usage,
        max_output_tokens=limits[limit_field] if limit_field else None, limit_field=limit_field, n=n, user=user,
        forwarded=forwarded, prompt=tokens.Prompt.of(messages, forwarded or None),
        conversation_id=conversation_id, memory=memory,
    )


def upstream_body(chat: ChatRequest, *, model_id: str, output_tokens: int,
                  output_field: str | None) -> dict[str, Any]:
    """The body to forward, built from the validated request: the catalog model id, the messages and the other
    validated fields, usage always asked for when streaming, and exactly one output limit, `output_tokens` (the
    per-choice allowance the hold covers). A reasoning budget never exceeds it."""
    body: dict[str, Any] = {"model": model_id, "messages": chat.messages, **chat.forwarded}
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and isinstance(reasoning.get("max_tokens"), int):
        body["reasoning"] = {**reasoning, "max_tokens": min(reasoning["max_tokens"], output_tokens)}
    if chat.n != 1:
        body["n"] = chat.n
    if chat.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body[output_field or chat.limit_field or "max_tokens"] = output_tokens
    return body
