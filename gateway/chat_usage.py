"""What a chat call used and what it cost, in the three shapes the edge needs: the usage the client sees
(with our charge), the fields of the request record, and the generated text used to estimate missing usage."""

from __future__ import annotations

from typing import Any

from billing import pricing
from billing.records import Outcome
from gateway.render import usd_number

# The upstream's cost breakdown describes what Meterline pays, not what the customer is charged.
_HIDDEN_USAGE_FIELDS = frozenset({"cost_details", "is_byok"})


def priced_usage(raw: dict[str, Any], cost_micros: int) -> dict[str, Any]:
    """The usage the client sees: the upstream's, with our charge as `cost` (USD, OpenRouter's field) and
    `cost_micros` (the exact integer)."""
    shown = {k: v for k, v in raw.items() if k not in _HIDDEN_USAGE_FIELDS}
    shown["cost"] = usd_number(cost_micros)
    shown["cost_micros"] = cost_micros
    return shown


def estimated_usage(usage: pricing.Usage) -> dict[str, Any]:
    """A usage object for a call whose upstream reported none, flagged as estimated."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens, "estimated": True}


def usage_outcome(usage: pricing.Usage, raw: dict[str, Any] | None, *, status: str = "completed",
                  error_code: str | None = None, error_message: str | None = None,
                  cost_prices: pricing.TokenPrices | None = None, generation_id: str | None = None) -> Outcome:
    """The request record's outcome for a settled call; `raw` is the upstream's usage (None when estimated). The
    upstream cost is the one the provider reported, else (a provider with a configured cost price) that price
    times the usage, by the one rounding rule."""
    reported = pricing.usd_to_micros_rounded(raw.get("cost")) if raw else None
    if reported is None and cost_prices is not None:
        reported = pricing.cost_micros(cost_prices, usage)
    return Outcome(
        status=status, error_code=error_code, error_message=error_message,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        upstream_cost_micros=reported,
        usage=raw,
        generation_id=generation_id,
    )


def generation_id(answer: Any) -> str | None:
    """The upstream's own id of a completion (OpenRouter's `gen-...`), from an answer or a stream chunk."""
    value = answer.get("id") if isinstance(answer, dict) else None
    return value[:200] if isinstance(value, str) and value else None


def finish_reasons(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each choice of a stream with its last finish reason, as `empty_completion` reads an answer's choices."""
    last: dict[Any, Any] = {}
    for chunk in chunks:
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict):
                index = choice.get("index", 0)
                key = index if isinstance(index, int) else 0
                if choice.get("finish_reason") is not None or key not in last:
                    last[key] = choice.get("finish_reason")
    return [{"finish_reason": reason} for reason in last.values()]


def empty_completion(usage: pricing.Usage, choices: Any) -> bool:
    """Zero-completion insurance, as OpenRouter gives it: a completion of zero completion tokens whose choices
    all ended in an error or never finished is not charged."""
    if usage.completion_tokens != 0:
        return False
    reasons = [choice.get("finish_reason") for choice in choices if isinstance(choice, dict)] \
        if isinstance(choices, list) else []
    return all(reason is None or reason in ("", "error") for reason in reasons)


def text_fields(message: Any) -> list[str]:
    """Generated text in a message or a stream delta: content, reasoning, tool-call names and arguments."""
    if not isinstance(message, dict):
        return []
    texts = [v for k in ("content", "reasoning") if isinstance(v := message.get(k), str)]
    # `reasoning_content` is the same text under its older name (gateway.chat_answer adds it beside `reasoning`):
    # counted only when it comes alone, as DeepSeek sends it.
    if not isinstance(message.get("reasoning"), str) and isinstance(legacy := message.get("reasoning_content"), str):
        texts.append(legacy)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts.extend(v for k in ("name", "arguments") if isinstance(v := function.get(k), str))
    return texts


def choice_texts(choices: Any, field: str) -> list[str]:
    """Generated text of every choice (`field` is "message" in an answer, "delta" in a stream chunk)."""
    texts: list[str] = []
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                texts.extend(text_fields(choice.get(field)))
    return texts
