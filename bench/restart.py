"""Restart: tasks lost and the time to re-adopt N user endpoints after ``kill -9`` of mepd.

For each mode — ``restart.adopt_endpoints: false`` (the default: user endpoints die with
the daemon) and ``true`` (they outlive it and are re-adopted) — one ``mepd serve`` on
127.0.0.1 with N accounts (made with ``useradd`` for the run, removed after): every
account submits a batch of tasks (echo, one in 20 sleeping a second) to its own user
endpoint; once all of them run, mepd is killed with SIGKILL and started again on the same
state directory. Measured: the acknowledged tasks, how many ended ``task.endpoint_lost``
(or failed otherwise), how many user endpoints are the same processes afterwards, and
the time from the new daemon's launch until every one of them is re-adopted (and the
last adoption's delay after the daemon opened its socket, from the ``endpoint.adopted``
audit records). Not root: nothing is measured (the daemon needs root for other accounts).

Usage: python bench/restart.py [--smoke] [--endpoints N] [--tasks N] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import fmt_seconds, is_root, poll_until, print_table, write_json  # noqa: E402

SLOW_EVERY = 20


def echo(x: Any) -> Any:
    return x


def slow(x: Any) -> Any:
    import time as _time

    _time.sleep(1.0)
    return x


def _pids_of(client: Any) -> list[int]:
    eps = client.get("/v1/endpoints/hpc/status").json()["user_endpoints"]
    return sorted(e["pid"] for e in eps if e["state"] == "ready")


def _audit(state: Path, event: str) -> list[dict[str, Any]]:
    path = state / "audit.jsonl"
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == event]


def _submit_all(
    daemon: Any, tokens: dict[str, str], tasks: int
) -> tuple[dict[str, Any], list[list[str]]]:
    from mepcore.tasks import pack_args, pack_function

    clients, ids = {}, []
    for identity, token in tokens.items():
        client = daemon.client(token)
        fids = {}
        for fn in (echo, slow):
            fid, body = pack_function(fn)
            client.post(
                "/v1/functions", json={"function": base64.b64encode(body).decode()}
            ).raise_for_status()
            fids[fn.__name__] = fid
        batch = [
            {
                "function_id": fids["slow" if i % SLOW_EVERY == 0 else "echo"],
                "args": base64.b64encode(pack_args((i,), {})).decode(),
            }
            for i in range(tasks)
        ]
        r = client.post("/v1/endpoints/hpc/submit", json={"tasks": batch})
        r.raise_for_status()
        ids.append(r.json()["task_ids"])
        clients[identity] = client
    return clients, ids


def run_mode(adopt: bool, endpoints: int, tasks: int) -> dict[str, Any]:
    from tests.accounts import create_account, delete_account
    from tests.daemon_harness import start_daemon, wait_all, write_runtime_deployment
    from tests.trusted_dir import trusted_directory

    made = [create_account() for _ in range(endpoints)]
    try:
        with trusted_directory("mep-bench-restart-") as top:
            config = write_runtime_deployment(
                top / "site",
                limits={"max_tasks_per_request": 10_000, "queued_tasks_per_user": 100_000},
                settings_extra={
                    "log_level": "warning",
                    "edge": {"rate": 1e9, "burst": 10**9},
                    "restart": {"adopt_endpoints": adopt, "grace_period": 120},
                },
            )
            state = top / "site" / "state"
            identities = [f"{m.pw_name}@example.org" for m in made]
            daemon = start_daemon(config, state, log_name="restart-1.log")
            try:
                # The local issuer's key is in the state directory: tokens outlive a restart.
                tokens = {i: daemon.token(i) for i in identities}
                clients, ids = _submit_all(daemon, tokens, tasks)
                before = {i: _pids_of(c) for i, c in clients.items()}
            finally:
                daemon.kill()
            began = time.monotonic()
            daemon = start_daemon(config, state, log_name="restart-2.log")
            try:
                clients = {i: daemon.client(tokens[i]) for i in identities}
                same = 0
                if adopt:
                    poll_until(
                        lambda: all(_pids_of(c) == before[i] for i, c in clients.items()),
                        60,
                    )
                readopt = time.monotonic() - began
                same = sum(1 for i, c in clients.items() if _pids_of(c) == before[i])
                views: dict[str, Any] = {}
                for identity, task_ids in zip(identities, ids, strict=True):
                    views.update(wait_all(clients[identity], task_ids, deadline=120))
            finally:
                daemon.stop()
            adopted = _audit(state, "endpoint.adopted")
    finally:
        for entry in made:
            delete_account(entry.pw_name)
    acknowledged = sum(len(t) for t in ids)
    reasons = [v.get("error", {}).get("reason") for v in views.values() if v["state"] != "success"]
    return {
        "adopt": adopt,
        "endpoints": endpoints,
        "acknowledged": acknowledged,
        "answered": len(views),
        "success": sum(1 for v in views.values() if v["state"] == "success"),
        "endpoint_lost": reasons.count("task.endpoint_lost"),
        "other_failures": len(reasons) - reasons.count("task.endpoint_lost"),
        "same_pids": same,
        "readopt_seconds": readopt if adopt and same == endpoints else None,
        "last_adoption_after_socket": max((e["seconds"] for e in adopted), default=None),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 endpoints, 40 tasks each")
    parser.add_argument("--endpoints", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=250, help="tasks per endpoint")
    parser.add_argument("--json", help="write the figures as JSON here")
    args = parser.parse_args()
    endpoints, tasks = (2, 40) if args.smoke else (args.endpoints, args.tasks)
    if not is_root():
        print("restart: not measured (needs root: makes accounts, mepd runs their endpoints)")
        write_json(args.json, {"measured": False})
        return 0
    results = [run_mode(adopt, endpoints, tasks) for adopt in (False, True)]
    rows = [
        [
            "adopt_endpoints: " + ("true" if r["adopt"] else "false"),
            str(r["endpoints"]),
            str(r["acknowledged"]),
            str(r["success"]),
            str(r["endpoint_lost"]),
            str(r["other_failures"]),
            f"{r['same_pids']}/{r['endpoints']}",
            fmt_seconds(r["readopt_seconds"]) if r["readopt_seconds"] is not None else "—",
            fmt_seconds(r["last_adoption_after_socket"])
            if r["last_adoption_after_socket"] is not None
            else "—",
        ]
        for r in results
    ]
    print_table(
        "Restart after kill -9 of mepd (tasks acknowledged before the kill)",
        [
            "mode",
            "user endpoints",
            "tasks acknowledged",
            "success",
            "task.endpoint_lost",
            "other failures",
            "same pids",
            "re-adopt all (from restart)",
            "last adoption (after socket open)",
        ],
        rows,
        notes=[
            "re-adopt all: from launching the new mepd until the status of every account "
            "shows its old user endpoint pid again (includes the daemon's own start)",
            "last adoption: the endpoint.adopted audit record's delay after the new daemon "
            "opened its adoption socket (orphaned endpoints retry with pauses up to 1 s)",
            f"each account submits its tasks in one batch; one task in {SLOW_EVERY} sleeps 1 s",
        ],
    )
    write_json(args.json, {"measured": True, "modes": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
