"""A chat answer as the client sees it: an alias's answers name the alias, never the upstream's model, and reasoning
text is given under both of its names.

An aliased model (`upstream_model` in its entry), like a model served by one of its providers under the provider's
own id, is forwarded under the upstream's id, so the upstream's answer
names that id; the client asked for the alias and is billed for it, and is shown it. Non-streaming, the answer's
`model` is set. Streaming, each event is rewritten as bytes: the `"model":"<upstream id>"` the upstream writes
(compact, or with `": "`) is replaced, and only an event naming another model (a dated version of the id, say) is
searched for its `model` field; no event is parsed for it. An answer from a model that is not an alias keeps the
upstream's `model`.

OpenRouter writes a message's (or a delta's) reasoning text as `reasoning`; DeepSeek, lumyx and the clients built
for them read `reasoning_content`. A message or delta with a `reasoning` string and no `reasoning_content` gains
`reasoning_content` with the same text; `reasoning_details` passes as it came. Streaming, only an event with a
`reasoning` string is parsed: a delta without reasoning (OpenRouter may write `"reasoning":null` into each) passes
as the bytes it came in.
"""

from __future__ import annotations

import json
import re
from typing import Any

from billing.catalog import CatalogEntry
from gateway.render import dumps

# Keys found in the raw bytes of a chunk. Neither pattern can match inside a JSON string (the content of an
# answer, say): there every quote is written `\"`, so no quote follows a word directly.
# A `model` key and its string value:
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# A `reasoning` key with a string value (never `reasoning_details`, nor a null):
_REASONING_TEXT = re.compile(rb'"reasoning"\s*:\s*"')
_DATA = b"data:"


class AnswerEdits:
    """What is changed in one call's answer on its way to the client (see the module docstring)."""

    __slots__ = ("_named", "_said", "alias")

    def __init__(self, entry: CatalogEntry, served_model: str | None = None) -> None:
        # `served_model`: the id the serving provider was sent (a model with providers); else the entry's own.
        forwarded = served_model or entry.forwarded_id
        self.alias = entry.id if forwarded != entry.id else None
        # The upstream's `model` field as it writes it (compact, and with OpenAI's spacing), and the alias's.
        said = json.dumps(forwarded).encode()
        self._said = (b'"model":' + said, b'"model": ' + said)
        self._named = b'"model":' + json.dumps(entry.id).encode()

    def answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming answer, changed in place (and returned)."""
        if self.alias is not None:
            answer["model"] = self.alias
        _add_reasoning_content(answer.get("choices"), "message")
        return answer

    def event(self, event: bytes) -> bytes:
        """A stream event's bytes, changed where needed; an event needing no change is returned as it is."""
        if self.alias is not None:
            event = self._renamed(event)
        if b'"reasoning"' in event and _REASONING_TEXT.search(event):
            event = _with_reasoning_content(event)
        return event

    def _renamed(self, event: bytes) -> bytes:
        for said in self._said:
            if said in event:
                return event.replace(said, self._named)
        if b'"model"' not in event:
            return event
        # The top-level `model` comes first in the chunks OpenRouter and OpenAI write.
        return _MODEL_FIELD.sub(lambda _: self._named, event, count=1)


def _add_reasoning_content(choices: Any, field: str) -> bool:
    """Give each choice's `field` ("message" or "delta") with a `reasoning` string and no `reasoning_content` the
    same text as `reasoning_content`; returns whether any changed."""
    changed = False
    if isinstance(choices, list):
        for choice in choices:
            message = choice.get(field) if isinstance(choice, dict) else None
            if (isinstance(message, dict) and isinstance(reasoning := message.get("reasoning"), str)
                    and message.get("reasoning_content") is None):
                message["reasoning_content"] = reasoning
                changed = True
    return changed


def _with_reasoning_content(event: bytes) -> bytes:
    """A stream chunk with `reasoning_content` added to its deltas; the event as it came if none needs it (or it
    is not a JSON chunk)."""
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(_DATA)]
    try:
        data = json.loads(b"\n".join(lines))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return event
    if not isinstance(data, dict) or not _add_reasoning_content(data.get("choices"), "delta"):
        return event
    return b"data: " + dumps(data).encode() + b"\n\n"
