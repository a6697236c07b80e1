"""Reading a Prometheus scrape in tests: every sample by name and labels, parsed by prometheus-client's own parser
(so a scrape that is not valid exposition text fails the test)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import METRICS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape by (name, labels); the text must parse as Prometheus's format."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a series that does not exist reads 0 (as Prometheus would find no increase)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def of_app(app: web.Application) -> Samples:
    """The figures an app's metrics hold now (its own registry: tests run in one process)."""
    return parse(app[METRICS].exposition().decode())
