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


# Fields forwarded as sent, with the check each must pass. Those marked priced in the module docstring carry the
# text the upstream bills beyond the messages; every one of them is counted into the prompt.
_FORWARDED: dict[str, Callable[[str, Any], None]] = {
    # input the upstream bills: tool and function definitions, JSON schemas, predicted output
    "tools": _array, "functions": _array, "tool_choice": _choice, "function_call": _choice,
    "response_format": _object, "prediction": _object,
    # sampling and output shape
    "temperature": _number, "top_p": _number, "top_k": _number, "min_p": _number, "top_a": _number,
    "frequency_penalty": _number, "presence_penalty": _number, "repetition_penalty": _number, "seed": _integer,
    "stop": _stop, "logit_bias": _object, "logprobs": _boolean, "top_logprobs": _integer,
    "parallel_tool_calls": _boolean, "reasoning_effort": _effort, "verbosity": _string, "reasoning": _reasoning,
    "modalities": _modalities, "service_tier": _tier,
    # bookkeeping and routing that do not change the price a call is charged at
    "metadata": _object, "store": _boolean, "prompt_cache_key": _string, "safety_identifier": _string,
    "provider": _object, "transforms": _strings, "usage": _object,
}
# Meterline's own fields (lumyx's stateful chat): consumed here, never forwarded.
STATEFUL = ("conversation_id", "memory")
_OWN = frozenset({"model", "messages", "stream", "stream_options", "n", "user", *OUTPUT_LIMITS, *STATEFUL})


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


def _positive(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    _integer(name, value)
    if value <= 0:
        raise invalid(f"{name} must be greater than 0", name)
    return int(value)


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
    return messages


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    _object("stream_options", options)
    for name, value in options.items():
        if name not in ("include_usage", "include_obfuscation"):
            raise invalid(f"Unrecognized request argument supplied: stream_options.{name}",
                          f"stream_options.{name}")
        _boolean(f"stream_options.{name}", value)
    return bool(options.get("include_usage", False))


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
    for name, value in body.items():
        if name in _OWN:
            continue
        if name in REFUSED:
            raise invalid(f"{name} is not supported: {REFUSED[name]}", name)
        check = _FORWARDED.get(name)
        if check is None:
            raise invalid(f"Unrecognized request argument supplied: {name}", name)
        if value is not None:
            check(name, value)
            forwarded[name] = value
    _effort_as_reasoning(forwarded)
    model = body.get("model")
    if model is None:
        raise invalid("model is required", "model")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model must be a non-empty string", "model")
    messages = _messages(body)
    stream = body.get("stream")
    if stream is None:
        stream = False
    _boolean("stream", stream)
    include_usage = _stream_options(body, stream)
    limits = {name: value for name in OUTPUT_LIMITS if (value := _positive(body, name)) is not None}
    limit_field = min(limits, key=limits.__getitem__) if limits else None
    n = _positive(body, "n") or 1
    if n > max_choices:
        raise invalid(f"n must be at most {max_choices}", "n")
    user = body.get("user")
    if user is not None:
        _string("user", user)
        if len(user) > MAX_USER_CHARS:
            raise invalid(f"user must be at most {MAX_USER_CHARS} characters", "user")
        forwarded["user"] = user
    conversation_id, memory = _stateful(body)
    return ChatRequest(
        model=model.strip(), messages=messages, stream=stream, include_usage=include_usage,
        max_output_tokens=limits[limit_field] if limit_field else None, limit_field=limit_field, n=n, user=user,
        forwarded=forwarded, prompt=tokens.Prompt.of(messages, forwarded or None),
        conversation_id=conversation_id, memory=memory,
    )


def _stateful(body: dict[str, Any]) -> tuple[uuid.UUID | None, bool]:
    raw = body.get("conversation_id")
    conversation_id = None
    if raw is not None:
        try:
            if not isinstance(raw, str):
                raise ValueError(raw)
            conversation_id = uuid.UUID(raw)
        except ValueError:
            raise invalid("conversation_id must be the UUID of a stored conversation", "conversation_id") from None
    memory = body.get("memory")
    if memory is None:
        memory = False
    _boolean("memory", memory)
    return conversation_id, memory


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
