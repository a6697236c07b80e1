"""A chat answer as the client sees it: an alias's answers name the alias, never the upstream's model.

An aliased model (`upstream_model` in its entry) is forwarded under the upstream's id, so the upstream's answer
names that id; the client asked for the alias and is billed for it, and is shown it. Non-streaming, the answer's
`model` is set. Streaming, each event is rewritten as bytes: the `"model":"<upstream id>"` the upstream writes
(compact, or with `": "`) is replaced, and only an event naming another model (a dated version of the id, say) is
searched for its `model` field; no event is parsed. An answer from a model that is not an alias is not touched.
"""

from __future__ import annotations

import json
import re
from typing import Any

from billing.catalog import CatalogEntry

# A `model` key and its JSON string value. Outside a string a `"` is never escaped, so this cannot match inside
# one (the content of an answer, say): in a string every quote is written `\"`.
_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')


class AnswerEdits:
    """What is changed in one call's answer on its way to the client (see the module docstring)."""

    __slots__ = ("_named", "_said", "alias")

    def __init__(self, entry: CatalogEntry) -> None:
        self.alias = entry.id if entry.upstream_model is not None else None
        # The upstream's `model` field as it writes it (compact, and with OpenAI's spacing), and the alias's.
        said = json.dumps(entry.forwarded_id).encode()
        self._said = (b'"model":' + said, b'"model": ' + said)
        self._named = b'"model":' + json.dumps(entry.id).encode()

    def answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        """A non-streaming answer, changed in place (and returned)."""
        if self.alias is not None:
            answer["model"] = self.alias
        return answer

    def event(self, event: bytes) -> bytes:
        """A stream event's bytes, changed where needed; an event needing no change is returned as it is."""
        if self.alias is not None:
            event = self._renamed(event)
        return event

    def _renamed(self, event: bytes) -> bytes:
        for said in self._said:
            if said in event:
                return event.replace(said, self._named)
        if b'"model"' not in event:
            return event
        # The top-level `model` comes first in the chunks OpenRouter and OpenAI write.
        return _MODEL_FIELD.sub(lambda _: self._named, event, count=1)
