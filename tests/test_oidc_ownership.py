"""Task ownership names the issuer, for every issuer type (tests/test_oidc.py has the
provider's tokens; here: an introspection issuer's tasks in a store written before its
configured ``issuer`` named it)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from mepd.daemon import STORE_FILE
from mepd.store import NewTask, TaskStore
from tests.daemon_harness import running_daemon, write_deployment
from tests.oidc import INTROSPECTION_CLIENT, OPAQUE_AUDIENCE, OpenIDProvider


def _task(owner: str) -> NewTask:
    return NewTask(str(uuid.uuid4()), owner, "hpc", "alice", "s1", "f" * 64, b"p", 10.0)


def test_rename_owners_moves_one_prefix_exactly(tmp_path: Path) -> None:
    store = TaskStore.open(tmp_path / "db")
    tasks = [
        _task("https://old|alice"),
        _task("https://old|bob|x"),
        _task("https://older|alice"),  # a longer issuer that starts the same way
        _task("mepd-local|https://old|alice"),
    ]
    store.add_tasks(tasks, state="queued", now=1.0)
    assert store.rename_owners("https://old|", "https://new|") == 2
    owners = {rec.task_id: rec.owner for rec in store.get_many([t.task_id for t in tasks])}
    assert [owners[t.task_id] for t in tasks] == [
        "https://new|alice",
        "https://new|bob|x",
        "https://older|alice",
        "mepd-local|https://old|alice",
    ]
    assert store.rename_owners("https://old|", "https://new|") == 0  # once
    store.close()


def test_tasks_owned_under_the_introspection_url_stay_the_callers(
    tmp_path: Path, oidc_provider: OpenIDProvider
) -> None:
    op = oidc_provider
    url = op.metadata("a")["introspection_endpoint"]
    top = tmp_path / "site"
    top.mkdir()
    secret = top / "secret"
    secret.write_text(INTROSPECTION_CLIENT[1])
    secret.chmod(0o600)
    issuer = {
        "type": "introspection",
        "url": url,
        "issuer": op.issuers["a"],
        "audience": OPAQUE_AUDIENCE,
        "client_id": INTROSPECTION_CLIENT[0],
        "client_secret_file": str(secret),
        "accept_client_tokens": True,
    }
    config = write_deployment(top, python="/usr/bin/python3", settings_extra={"issuers": [issuer]})
    state = top / "state"
    state.mkdir(mode=0o700)
    # What mep wrote before: the owner named the introspection URL.
    store = TaskStore.open(state / STORE_FILE)
    old = _task(f"{url}|mep-service")
    store.add_tasks([old], state="dispatched", now=1.0)
    store.close()
    token = op.client_credentials("a", "urn:mep:opaque")["access_token"]
    with running_daemon(config, state) as daemon, daemon.client(token) as client:
        r = client.get(f"/v1/tasks/{old.task_id}")
        assert r.status_code == 200, r.text
        assert r.json()["task_id"] == old.task_id
    records = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    renamed = [r for r in records if r.get("event") == "store.owners_renamed"]
    assert renamed and renamed[0]["tasks"] == 1 and renamed[0]["new"] == op.issuers["a"]
