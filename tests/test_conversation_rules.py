"""The rules of stateful chat, as properties (Hypothesis): the replay layout, trimming history to the context,
the dryRun lines that itemise history and memory, and a streamed answer put back together."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from fractions import Fraction
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from billing import pricing, tokens
from billing.conversations import Context, Turn, _first_kept, _held, itemised, weight
from billing.pricing import TokenPrices
from billing.text import HoldRules
from gateway.chat_stream import streamed_message

RULES = HoldRules(safety_factor=Decimal("1.25"), min_output_tokens=16, bound_above_chars=256,
                  default_max_output_tokens=4096, overhead_per_message=4, overhead_per_request=32,
                  overhead_with_tools=400)
words = st.text(alphabet="abcdefghij klmnop", min_size=1, max_size=40)


def message(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


@st.composite
def stored_dialogue(draw: st.DrawFn) -> list[Turn]:
    """Exchanges of one or two user turns and an answer, sometimes a tool call answered in the next exchange."""
    turns: list[Turn] = []
    for exchange in range(draw(st.integers(0, 8))):
        request_id = f"req_{exchange}"
        roles = ["tool"] if turns and turns[-1].message.get("tool_calls") and draw(st.booleans()) else []
        roles += ["user"] * draw(st.integers(1, 2)) + ["assistant"]
        for role in roles:
            body = message(role, draw(words))
            if role == "assistant" and draw(st.booleans()):
                body["tool_calls"] = [{"id": "call", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
            turns.append(Turn(len(turns), request_id, role, body, draw(st.integers(1, 300))))
    return turns


@settings(deadline=None)  # rules, not timings: a loaded machine must not fail them
@given(stored_dialogue(), st.integers(0, 3_000))
def test_history_is_trimmed_by_whole_exchanges_oldest_first_to_the_least_that_fits(
        dialogue: list[Turn], room: int) -> None:
    context = Context(conversation_id=uuid.uuid4(), new=False, learn=False)
    new = [message("user", "and now?")]
    start = asyncio.run(_first_kept(dialogue, [], context, new, None, room=room, rules=RULES))
    kept = dialogue[start:]
    assert not kept or kept[0].role != "tool"  # a tool result never opens the replay without its call
    assert start == 0 or start == len(dialogue) or dialogue[start].request_id != dialogue[start - 1].request_id \
        or dialogue[start - 1].role == "tool"
    prompt = tokens.Prompt.of(new)
    fixed = weight(prompt, asyncio.run(prompt.count()))
    if start:
        # The exchange dropped last was needed: with it the prompt did not fit.
        boundary = max(i for i in range(start) if i == 0 or dialogue[i].request_id != dialogue[i - 1].request_id)
        with_it = sum(t.tokens for t in dialogue[boundary:])
        assert _held(fixed + with_it, 1 + len(dialogue) - boundary, False, RULES) > room or \
            dialogue[start - 1].role == "tool"


@settings(deadline=None)  # rules, not timings: a loaded machine must not fail them
@given(st.lists(st.tuples(st.sampled_from(["system", "developer", "user", "assistant"]), words), max_size=6),
       st.lists(st.tuples(st.sampled_from(["system", "user", "tool"]), words), min_size=1, max_size=4),
       st.booleans())
def test_the_replay_is_instructions_then_memory_then_the_dialogue(
        history: list[tuple[str, str]], new: list[tuple[str, str]], with_memory: bool) -> None:
    from billing.conversations import Recalled

    stored = [message(role, text) for role, text in history]
    sent_new = [message(role, text) for role, text in new]
    context = Context(conversation_id=uuid.uuid4(), new=False, learn=False,
                      history=[m for m in stored if m["role"] not in ("system", "developer")],
                      instructions=[m for m in stored if m["role"] in ("system", "developer")])
    if with_memory:
        context.memories = [Recalled(uuid.uuid4(), uuid.uuid4(), "User: x\nAssistant: y", 9)]
    sent = context.messages(sent_new)
    own = [m for m in sent_new if m["role"] == "system"]
    instructions = own or context.instructions
    memory = [context.memory] if with_memory else []
    if context.history or context.instructions:
        assert sent == [*instructions, *memory, *context.history, *[m for m in sent_new if m["role"] != "system"]]
    else:  # nothing stored to replay: the new messages as sent, memory after their leading instructions
        assert [m for m in sent if m not in memory] == sent_new
    assert sent.count(context.memory) == (1 if with_memory else 0)


@settings(deadline=None)  # rules, not timings: a loaded machine must not fail them
@given(st.integers(0, 20_000), st.integers(1, 5_000), st.integers(0, 4_000), st.integers(0, 4_000),
       st.integers(1, 30_000_000), st.integers(1, 30_000_000))
def test_dry_run_lines_with_history_and_memory_add_up_to_the_hold(
        counted: int, output: int, history: int, memory: int, input_price: int, output_price: int) -> None:
    prices = TokenPrices(Fraction(input_price), Fraction(output_price))
    padded = pricing.padded_prompt_tokens(counted, RULES.safety_factor) + 36
    estimate = pricing.token_estimate(prices, counted_prompt_tokens=counted, padded_prompt_tokens=padded,
                                      max_output_tokens=output)
    lines = itemised(estimate, prices, safety_factor=RULES.safety_factor, history_tokens=min(history, counted),
                     memory_tokens=min(memory, counted - min(history, counted))).components
    assert sum(line.total_cost_micros for line in lines) == estimate.total_micros
    assert all(line.total_cost_micros >= 0 and line.billable_quantity >= 0 for line in lines)
    assert sum(line.billable_quantity for line in lines if line.type != "output") == padded


@settings(deadline=None)  # rules, not timings: a loaded machine must not fail them
@given(st.text(max_size=60), st.text(max_size=30), st.lists(st.integers(1, 7), min_size=1, max_size=12))
def test_a_streamed_answer_is_put_back_together_however_it_was_cut(content: str, arguments: str,
                                                                  cuts: list[int]) -> None:
    def pieces(text: str) -> list[str]:
        out, at = [], 0
        for size in cuts:
            out.append(text[at:at + size])
            at += size
        return [*out, text[at:]]

    chunks: list[dict[str, Any]] = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces(content)]
    chunks += [{"choices": [{"index": 1, "delta": {"content": "another choice"}}]}]
    chunks += [{"choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, **({"id": "call_1", "type": "function"} if n == 0 else {}),
         "function": {**({"name": "lookup"} if n == 0 else {}), "arguments": piece}}]}}]}
        for n, piece in enumerate(pieces(arguments))]
    chunks = json.loads(json.dumps(chunks))  # as parsed from the wire
    assert streamed_message(chunks) == {
        "role": "assistant", "content": content,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}}]}
