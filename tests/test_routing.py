"""The provider order rule (gateway/routing.py) and the providers configuration (billing/catalog_config.py)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from billing.catalog_config import ModelConfig
from gateway.breaker import Breakers
from gateway.errors import ApiError
from gateway.routing import Preference, Route, order, parse_preference
from gateway.settings import SettingsError, load_settings
from gateway.upstream import report_unconfigured

CONFIG = TypeAdapter(ModelConfig)
TEXT = {"modality": "text", "input_per_mtok_micros": 3_000_000, "output_per_mtok_micros": 9_000_000,
        "context_length": 32_000, "max_output_tokens": 4096}
PROVIDERS = [
    {"upstream": "openrouter", "model": "acme/plain", "priority": 1, "input_cost_per_mtok_micros": 2_000_000,
     "output_cost_per_mtok_micros": 8_000_000},
    {"upstream": "backup", "model": "vendor/plain", "priority": 2, "input_cost_per_mtok_micros": 1_000_000,
     "output_cost_per_mtok_micros": 4_000_000},
]


def test_the_issues_configuration_reads_as_written() -> None:
    config = CONFIG.validate_python({**TEXT, "providers": PROVIDERS})
    assert config.providers is not None
    assert [(p.provider_name, p.model, p.priority, p.input_cost_per_mtok_micros) for p in config.providers] == [
        ("openrouter", "acme/plain", 1, 2_000_000), ("backup", "vendor/plain", 2, 1_000_000)]
    image = CONFIG.validate_python({"modality": "image", "per_image_micros": 40_000, "sizes": ["1024x1024"],
                                    "providers": [{"upstream": "media", "model": "img-1",
                                                   "per_image_cost_micros": 30_000}]})
    assert image.providers is not None and image.providers[0].per_image_cost_micros == 30_000


@pytest.mark.parametrize(("change", "complaint"), [
    ({"upstream": "openrouter"}, "either providers or upstream"),
    ({"upstream_model": "x"}, "either providers or upstream"),
    ({"providers": []}, "at least 1"),
    ({"providers": [PROVIDERS[0], {**PROVIDERS[1], "upstream": "openrouter"}]}, "unique"),
    ({"providers": [{**PROVIDERS[0], "per_image_cost_micros": 5}]}, "per_image_cost_micros"),
    ({"providers": [{**PROVIDERS[0], "input_cost_per_mtok_micros": 1.5}]}, "input_cost_per_mtok_micros"),
    ({"providers": [{**PROVIDERS[0], "weight": 0}]}, "weight"),
])
def test_a_providers_configuration_that_cannot_be_right_is_refused_naming_why(change: dict, complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        CONFIG.validate_python({**TEXT, "providers": PROVIDERS, **change})


def _routes(*specs: tuple[str, int, int]) -> list[Route]:
    return [Route(name=name, upstream=name, model=f"m-{name}", priority=priority, weight=weight)
            for name, priority, weight in specs]


ROUTES = _routes(("a", 1, 1), ("b", 1, 3), ("c", 2, 1), ("d", 3, 1))


def test_priority_then_weight_decide_the_order() -> None:
    rng = random.Random(7)
    firsts = Counter(order(ROUTES, Preference(), None, rng)[0][0].name for _ in range(8000))
    assert set(firsts) == {"a", "b"}
    assert 0.72 < firsts["b"] / 8000 < 0.78  # weight 3 of 4
    tried, skipped = order(ROUTES, Preference(), None, rng)
    assert [r.name for r in tried[2:]] == ["c", "d"] and skipped == []


def test_an_open_breaker_skips_its_provider_until_it_half_opens() -> None:
    now = [0.0]
    breakers = Breakers(threshold=2, cooldown_seconds=30, clock=lambda: now[0])
    for _ in range(2):
        breakers.failed(("c", "m-c"))
    tried, skipped = order(ROUTES, Preference(order=("c",)), breakers, random.Random(1))
    assert [r.name for r in skipped] == ["c"] and "c" not in [r.name for r in tried]
    now[0] = 30.0
    tried, skipped = order(ROUTES, Preference(order=("c",)), breakers, random.Random(1))
    assert tried[0].name == "c" and skipped == []


def test_a_request_may_order_limit_or_exclude_providers_by_name() -> None:
    rng = random.Random(3)

    def names(raw: dict) -> list[str]:
        return [r.name for r in order(ROUTES, parse_preference(raw, ROUTES), None, rng)[0]]

    assert names({"order": ["d", "c"]})[:2] == ["d", "c"] and sorted(names({"order": ["d", "c"]})[2:]) == ["a", "b"]
    assert names({"order": ["d", "c"], "allow_fallbacks": False}) == ["d", "c"]
    assert sorted(names({"only": ["a", "d"]})) == ["a", "d"]
    assert "b" not in names({"ignore": ["b"]})


@pytest.mark.parametrize(("raw", "param"), [
    ({"order": ["nope"]}, "provider.order"),
    ({"order": "a"}, "provider.order"),
    ({"only": [1]}, "provider.only"),
    ({"allow_fallbacks": "no"}, "provider.allow_fallbacks"),
    ({"sort": "price"}, "provider.sort"),
])
def test_a_preference_that_cannot_be_honoured_is_a_400_naming_it(raw: dict, param: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_preference(raw, ROUTES)
    assert (caught.value.status, caught.value.body()["error"]["param"]) == (400, param)


_ROUTE_SPECS = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5)), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(specs=_ROUTE_SPECS, seed=st.integers(0, 2**32), data=st.data())
def test_the_order_is_the_preferred_then_the_rest_by_priority_without_loss_or_repeat(
        specs: list[tuple[int, int]], seed: int, data: st.DataObject) -> None:
    routes = _routes(*((f"p{i}", priority, weight) for i, (priority, weight) in enumerate(specs)))
    names = [r.name for r in routes]
    preferred = tuple(data.draw(st.lists(st.sampled_from(names), unique=True)))
    fallbacks = data.draw(st.booleans())
    tried, skipped = order(routes, Preference(order=preferred, allow_fallbacks=fallbacks), None,
                           random.Random(seed))
    got = [r.name for r in tried]
    assert skipped == [] and len(got) == len(set(got))
    assert got[:len(preferred)] == list(preferred)
    rest = tried[len(preferred):]
    if preferred and not fallbacks:
        assert rest == []
    else:
        assert sorted(r.name for r in rest) == sorted(set(names) - set(preferred))
        assert [r.priority for r in rest] == sorted(r.priority for r in rest)


def _routed_settings(tmp_path: Any, timeout: int, hold_ttl: int) -> Any:
    config = tmp_path / "routed.toml"
    config.write_text(f"""
hold_ttl_seconds = {hold_ttl}
drain_seconds = 30
[upstreams.alpha]
base_url = "https://alpha.example/v1"
api_key_env = "ALPHA_KEY"
timeout_seconds = {timeout}
[upstreams.openrouter]
base_url = "https://openrouter.example/api/v1"
api_key_env = "OPENROUTER_API_KEY"
timeout_seconds = {timeout}
[models."acme/routed"]
modality = "text"
input_per_mtok_micros = 3000000
output_per_mtok_micros = 9000000
context_length = 32000
max_output_tokens = 4096
providers = [
  {{ upstream = "openrouter", model = "acme/plain", priority = 1,
     input_cost_per_mtok_micros = 2000000, output_cost_per_mtok_micros = 8000000 }},
  {{ upstream = "alpha", model = "vendor/plain", priority = 2,
     input_cost_per_mtok_micros = 1000000, output_cost_per_mtok_micros = 4000000 }},
  {{ upstream = "gamma", model = "g/plain", input_cost_per_mtok_micros = 1, output_cost_per_mtok_micros = 1 }},
]
""")
    return load_settings(config=config)


def test_a_hold_must_outlast_trying_every_provider_of_a_model_in_turn(tmp_path: Any) -> None:
    with pytest.raises(SettingsError, match=r"every provider of model 'acme/routed' together plus drain_seconds "
                                            r"\(430\)"):
        _routed_settings(tmp_path, timeout=200, hold_ttl=429)
    assert _routed_settings(tmp_path, timeout=200, hold_ttl=431).hold_ttl_seconds == 431


def test_start_names_a_providers_upstream_that_is_not_configured(tmp_path: Any) -> None:
    lines = report_unconfigured(_routed_settings(tmp_path, timeout=60, hold_ttl=900))
    assert any("'gamma' is not configured" in line for line in lines)
    assert any("'alpha' has no API key: set the environment variable ALPHA_KEY" in line for line in lines)
