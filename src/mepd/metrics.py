"""Prometheus metrics of the daemon, in the text exposition format, written by hand.

Counters and histograms with labels, held by a ``Metrics`` object the daemon creates
(no module-level registry, so tests get fresh metrics). Gauges whose value lives
elsewhere (user endpoints, tasks by state) are read through callbacks at scrape time.
Deliberately minimal: no exemplars, no summaries, no push gateway.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping

import attrs

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

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Mapping[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _render_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


@attrs.define
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = attrs.field(factory=dict)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_render_labels(k)} {v:g}" for k, v in sorted(self.values.items())]
        return out


@attrs.define
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    series: dict[Labels, tuple[list[int], list[float]]] = attrs.field(factory=dict)

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        entry = self.series.get(key)
        if entry is None:
            entry = ([0] * (len(self.buckets) + 1), [0.0])
            self.series[key] = entry
        entry[0][bisect.bisect_left(self.buckets, value)] += 1
        entry[1][0] += value

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, (counts, total) in sorted(self.series.items()):
            running = 0
            for bound, count in zip(self.buckets, counts, strict=False):
                running += count
                out.append(
                    f"{self.name}_bucket{_render_labels(key, (('le', f'{bound:g}'),))} {running}"
                )
            running += counts[-1]
            out.append(f"{self.name}_bucket{_render_labels(key, (('le', '+Inf'),))} {running}")
            out.append(f"{self.name}_sum{_render_labels(key)} {total[0]:g}")
            out.append(f"{self.name}_count{_render_labels(key)} {running}")
        return out


@attrs.define
class Metrics:
    """Every metric mepd exports."""

    requests: Counter = attrs.field(
        factory=lambda: Counter("mepd_http_requests_total", "HTTP requests by route and status")
    )
    latency: Histogram = attrs.field(
        factory=lambda: Histogram("mepd_http_request_seconds", "HTTP request latency by route")
    )
    decisions: Counter = attrs.field(
        factory=lambda: Counter("mepd_authz_decisions_total", "authorization decisions")
    )
    auth_failures: Counter = attrs.field(
        factory=lambda: Counter("mepd_auth_failures_total", "authentication failures by reason")
    )
    tasks: Counter = attrs.field(
        factory=lambda: Counter("mepd_tasks_total", "tasks that reached a state")
    )
    task_seconds: Histogram = attrs.field(
        factory=lambda: Histogram("mepd_task_seconds", "time from acceptance to result")
    )
    gauges: dict[str, tuple[str, Callable[[], Mapping[Labels, float]]]] = attrs.field(factory=dict)

    def gauge(self, name: str, help_text: str, read: Callable[[], Mapping[Labels, float]]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.latency,
            self.decisions,
            self.auth_failures,
            self.tasks,
            self.task_seconds,
        ):
            lines += metric.render()
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_render_labels(k)} {v:g}" for k, v in sorted(read().items())]
        return "\n".join(lines) + "\n"


def labels(**items: str) -> Labels:
    """Label set for a gauge callback's answer."""
    return _labels(items)
