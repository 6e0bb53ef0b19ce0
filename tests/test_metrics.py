"""Observability (issue 21, item 4): metrics on prometheus_client, logs through structlog.

- ``mepd.metrics.Metrics``: its own registry per instance, every metric name mepd has
  always exported, the process collectors and ``mep_build_info``;
- a real daemon (``mepd init``'s files, ``mepd serve``): a scrape of its ``/metrics``
  carries every metric that ``packaging/grafana-dashboard.json`` and
  ``packaging/prometheus-alerts.yaml`` use; every line of its log is one JSON object with
  an RFC 3339 UTC ``timestamp`` (uvicorn's lines included); each request has one access
  line (request id, owner, route, status, duration) and its ``X-Request-ID``; a refusal
  names the caller's identity and issuer; the audit log's ``ts`` has the same format.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import yaml

from mepd.logs import rfc3339
from mepd.metrics import Metrics, labels
from tests.daemon_harness import RunningDaemon, start_daemon
from tests.trusted_dir import trusted_directory

REPO = Path(__file__).resolve().parents[1]
# mepd init options: any free port, and the state directory (given last).
INIT_OPTIONS = ("--port", "0", "--state-dir")
DASHBOARD = REPO / "packaging" / "grafana-dashboard.json"
ALERTS = REPO / "packaging" / "prometheus-alerts.yaml"
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
# Every name mepd exported before prometheus_client (tests, docs/api.md, dashboards).
KEPT_NAMES = (
    "mepd_http_requests_total",
    "mepd_http_request_seconds",
    "mepd_authz_decisions_total",
    "mepd_auth_failures_total",
    "mepd_tasks_total",
    "mepd_task_seconds",
    "mepd_tasks_in_flight",
    "mepd_tasks_pending",
    "mepd_user_endpoints",
    "mepd_audit_available",
)
METRIC_NAME = re.compile(r"\b((?:mepd?|process|python)_[a-z0-9_]+)\b")


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can answer: families (with a histogram's suffixes) and
    samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def used_names() -> dict[str, set[str]]:
    """Metric names in the dashboard's and the alert rules' expressions."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [
        variable["definition"]
        for variable in dashboard["templating"]["list"]
        if "definition" in variable
    ]
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = [rule["expr"] for group in rules for rule in group["rules"]]
    return {
        "dashboard": {n for e in exprs for n in METRIC_NAME.findall(e)},
        "alerts": {n for e in alerts for n in METRIC_NAME.findall(e)},
    }


# -- the metrics object ------------------------------------------------------------------


def test_each_metrics_object_has_its_own_registry_with_every_kept_name() -> None:
    one, two = Metrics(), Metrics()
    one.requests.inc(route="submit", status="200")
    one.tasks.inc(3, state="received")
    one.gauge("mepd_tasks_pending", "pending", lambda: {labels(account="alice"): 2.0})
    text = one.render()
    assert 'mepd_http_requests_total{route="submit",status="200"} 1.0' in text
    assert 'mepd_tasks_total{state="received"} 3.0' in text
    assert 'mepd_tasks_pending{account="alice"} 2.0' in text
    assert "mepd_http_requests_total{" not in two.render()
    for name in ("mepd_tasks_in_flight", "mepd_audit_available", "mepd_user_endpoints"):
        two.gauge(name, name, lambda: {labels(): 1.0})
    two.gauge("mepd_tasks_pending", "pending", dict)
    found = exported_names(two.render())
    assert set(KEPT_NAMES) <= found
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= found
    assert re.search(
        r'^mep_build_info\{python="[0-9.]+",version="[^"]+"\} 1\.0$', two.render(), re.M
    )


def test_rfc3339_is_utc_with_microseconds() -> None:
    assert rfc3339(0.0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"
    assert rfc3339(1_700_000_000.9999996) == "2023-11-14T22:13:21.000000Z"


# -- a real daemon -------------------------------------------------------------------------


@attrs.frozen
class Scraped:
    daemon: RunningDaemon
    metrics: str
    log: list[dict[str, Any]]
    audit: list[dict[str, Any]]
    given_id: str
    answered_id: str


@pytest.fixture(scope="module")
def scraped() -> Iterator[Scraped]:
    with trusted_directory("mept-metrics-") as top:
        init = subprocess.run(
            [
                sys.executable,
                "-m",
                "mepd",
                "init",
                str(top / "etc"),
                *INIT_OPTIONS,
                str(top / "state"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert init.returncode == 0, init.stderr
        config = top / "etc" / "mepd.yaml"
        daemon = start_daemon(config, top / "state")
        try:
            token = daemon.token("nosuchaccount@example.org")
            with daemon.client(token) as client:
                function = base64.b64encode(b"not really a function").decode()
                registered = client.post(
                    "/v1/functions",
                    json={"function": function, "name": "f"},
                    headers={"X-Request-ID": "test-request-1"},
                )
                assert registered.status_code == 200, registered.text
                refused = client.get("/v1/endpoints/local/status")
                assert refused.status_code == 403, refused.text
                anonymous = httpx.get(daemon.url + "/v1/endpoints/local/status", timeout=30)
                assert anonymous.status_code == 401
                metrics = client.get("/metrics")
                assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        finally:
            assert daemon.stop() == 0
        log = [json.loads(line) for line in daemon.stderr().splitlines() if line.strip()]
        audit_path = top / "state" / "audit.jsonl"
        audit = [json.loads(line) for line in audit_path.read_text().splitlines()]
        yield Scraped(
            daemon,
            metrics.text,
            log,
            audit,
            registered.headers["X-Request-ID"],
            refused.headers["X-Request-ID"],
        )


def test_every_metric_of_the_dashboard_and_the_alerts_is_exported(scraped: Scraped) -> None:
    exported = exported_names(scraped.metrics)
    for where, names in used_names().items():
        assert names, where
        assert names <= exported, f"{where} uses metrics mepd does not export: {names - exported}"
    assert set(KEPT_NAMES) <= exported
    assert 'mepd_http_requests_total{route="functions",status="200"} 1.0' in scraped.metrics


def test_every_log_line_is_json_with_one_timestamp_format(scraped: Scraped) -> None:
    assert scraped.log
    for line in scraped.log:
        assert RFC3339_UTC.match(line["timestamp"]), line
        assert line["level"] in ("debug", "info", "warning", "error", "critical"), line
    # uvicorn's own messages come through the same JSON.
    assert any(line.get("logger", "").startswith("uvicorn") for line in scraped.log)
    for record in scraped.audit:
        assert RFC3339_UTC.match(record["ts"]), record


def test_each_request_has_an_access_line_with_its_request_id(scraped: Scraped) -> None:
    access = [line for line in scraped.log if line["event"] == "api.request_completed"]
    by_id = {line["request_id"]: line for line in access}
    # A plain X-Request-ID the client sends is kept; otherwise mepd makes one.
    assert scraped.given_id == "test-request-1"
    registered = by_id["test-request-1"]
    assert registered["route"] == "functions" and registered["status"] == 200
    assert registered["method"] == "POST" and registered["duration_ms"] >= 0
    assert registered["owner"].endswith("|" + registered["identity"])
    assert registered["username"] == "nosuchaccount@example.org"
    assert re.fullmatch(r"[0-9a-f]{32}", scraped.answered_id)
    assert by_id[scraped.answered_id]["status"] == 403
    anonymous = [line for line in access if line["status"] == 401]
    assert anonymous and anonymous[0]["owner"] is None


def test_a_refusal_names_the_caller_and_the_issuer(scraped: Scraped) -> None:
    refused = [
        line
        for line in scraped.log
        if line["event"] == "api.request_refused" and line.get("request_id") == scraped.answered_id
    ]
    assert len(refused) == 1, refused
    line = refused[0]
    assert line["reason"].startswith("identity.account_")  # the specific (admin) code
    assert line["username"] == "nosuchaccount@example.org"
    assert line["issuer"] and line["identity"]
    assert line["owner"] == f"{line['issuer']}|{line['identity']}"
