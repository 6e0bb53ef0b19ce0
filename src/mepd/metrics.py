"""Prometheus metrics of the daemon, on ``prometheus_client`` (the only module that imports it).

A ``Metrics`` object owns its own ``CollectorRegistry`` (never the library's global one:
each daemon, and each test, gets fresh metrics) with:

- the daemon's counters and histograms (``mepd_http_requests_total``,
  ``mepd_http_request_seconds``, ``mepd_authz_decisions_total``,
  ``mepd_auth_failures_total``, ``mepd_tasks_total``, ``mepd_task_seconds``, and the
  retention sweep's ``mepd_results_expired_total``, ``mepd_results_evicted_total``,
  ``mepd_results_evicted_bytes_total``), kept behind
  the small ``inc``/``observe`` interface the pipeline already used, so no caller knows
  the library;
- gauges whose value lives elsewhere (user endpoints by state, tasks in flight and
  pending, the audit log's availability), read through callbacks at scrape time by one
  custom collector, so they can never disagree with the state they describe;
- the standard process and platform collectors (``process_*``: CPU seconds, resident
  memory, open file descriptors, start time; ``python_info``; ``python_gc_*``) and
  ``mep_build_info{version, python}``.

``render()`` is the text exposition format. Deliberately not here: an HTTP server of its
own (``GET /metrics`` is a route of the API), push gateways, exemplars, multiprocess mode
(the daemon is one process; user endpoints export nothing).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client import Counter as _PromCounter
from prometheus_client import Histogram as _PromHistogram
from prometheus_client import Info as _PromInfo
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mepd import __version__

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

# The media type of ``render()``'s text (the classic 0.0.4 text format: every name here
# is a legacy one, so no escaping is involved), for the HTTP answer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def labels(**items: str) -> Labels:
    """Label set for a gauge callback's answer."""
    return tuple(sorted(items.items()))


# Label children remembered per metric (prometheus_client's ``labels()`` validates and
# joins the values at every call); the label values mepd passes are few (routes, status
# codes, reason codes, states), so this bound is only a guard.
MAX_CACHED_CHILDREN = 4096


def _child(
    metric: Any, cache: dict[tuple[tuple[str, str], ...], Any], labels: dict[str, str]
) -> Any:
    key = tuple(labels.items())
    child = cache.get(key)
    if child is None:
        child = metric.labels(**labels)
        if len(cache) >= MAX_CACHED_CHILDREN:
            cache.clear()
        cache[key] = child
    return child


@attrs.frozen
class Counter:
    """A counter with declared label names; ``inc(amount, **labels)``."""

    metric: _PromCounter
    _children: dict[tuple[tuple[str, str], ...], Any] = attrs.field(factory=dict, init=False)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        (_child(self.metric, self._children, labels) if labels else self.metric).inc(amount)


@attrs.frozen
class Histogram:
    """A histogram with declared label names; ``observe(value, **labels)``."""

    metric: _PromHistogram
    _children: dict[tuple[tuple[str, str], ...], Any] = attrs.field(factory=dict, init=False)

    def observe(self, value: float, **labels: str) -> None:
        (_child(self.metric, self._children, labels) if labels else self.metric).observe(value)


GaugeReader = Callable[[], Mapping[Labels, float]]


@attrs.define(eq=False)
class _CallbackGauges(Collector):
    """Gauges read at scrape time: name -> (help, callback returning label set -> value).
    Compared by identity: the registry keeps collectors in a dict."""

    gauges: dict[str, tuple[str, GaugeReader]] = attrs.field(factory=dict)

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, read) in sorted(self.gauges.items()):
            values = read()
            names = sorted({key for label_set in values for key, _ in label_set})
            family = GaugeMetricFamily(name, help_text, labels=names)
            for label_set, value in sorted(values.items()):
                given = dict(label_set)
                family.add_metric([given.get(key, "") for key in names], float(value))
            yield family

    def describe(self) -> Iterator[Metric]:
        # Names only (the registry checks for duplicates); values are read at scrape.
        for name, (help_text, _read) in sorted(self.gauges.items()):
            yield GaugeMetricFamily(name, help_text)


def _counter(registry: CollectorRegistry, name: str, help_text: str, *names: str) -> Counter:
    return Counter(_PromCounter(name, help_text, labelnames=names, registry=registry))


def _histogram(registry: CollectorRegistry, name: str, help_text: str, *names: str) -> Histogram:
    metric = _PromHistogram(
        name, help_text, labelnames=names, buckets=LATENCY_BUCKETS, registry=registry
    )
    return Histogram(metric)


@attrs.define
class Metrics:
    """Every metric mepd exports, in a registry of its own (``Metrics()``: a fresh one)."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    requests: Counter = attrs.field(init=False)
    latency: Histogram = attrs.field(init=False)
    decisions: Counter = attrs.field(init=False)
    auth_failures: Counter = attrs.field(init=False)
    tasks: Counter = attrs.field(init=False)
    task_seconds: Histogram = attrs.field(init=False)
    results_expired: Counter = attrs.field(init=False)
    results_evicted: Counter = attrs.field(init=False)
    results_evicted_bytes: Counter = attrs.field(init=False)
    _gauges: _CallbackGauges = attrs.field(init=False, factory=_CallbackGauges)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        build = _PromInfo(
            "mep_build", "the running mep: its version and Python's", registry=registry
        )
        build.info({"version": __version__, "python": platform.python_version()})
        registry.register(self._gauges)
        self.requests = _counter(
            registry,
            "mepd_http_requests_total",
            "HTTP requests by route and status",
            "route",
            "status",
        )
        self.latency = _histogram(
            registry, "mepd_http_request_seconds", "HTTP request latency by route", "route"
        )
        self.decisions = _counter(
            registry, "mepd_authz_decisions_total", "authorization decisions", "action", "allowed"
        )
        self.auth_failures = _counter(
            registry, "mepd_auth_failures_total", "authentication failures by reason", "reason"
        )
        self.tasks = _counter(registry, "mepd_tasks_total", "tasks that reached a state", "state")
        self.task_seconds = _histogram(
            registry, "mepd_task_seconds", "time from acceptance to result"
        )
        self.results_expired = _counter(
            registry, "mepd_results_expired_total", "finished tasks removed after retention"
        )
        self.results_evicted = _counter(
            registry,
            "mepd_results_evicted_total",
            "finished tasks removed early: their account kept more than its bounds",
            "account",
        )
        self.results_evicted_bytes = _counter(
            registry,
            "mepd_results_evicted_bytes_total",
            "result bytes of the finished tasks removed early",
            "account",
        )

    def gauge(self, name: str, help_text: str, read: GaugeReader) -> None:
        """A gauge whose values ``read()`` returns at each scrape."""
        self._gauges.gauges[name] = (help_text, read)

    def render(self) -> str:
        """Every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry).decode("utf-8")
