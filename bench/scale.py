"""Scale: many users at once, and the daemon's memory and descriptors over 100,000 tasks.

Two phases against one ``mepd serve`` on 127.0.0.1:

1. *Endurance* (one user): 100,000 no-op tasks in batches over HTTP (submit, then
   long-poll every result), with the daemon's RSS and open descriptors read after a
   warm-up and after every tenth of the run. "No growth" means the descriptors come back
   to the warm-up count and the RSS peak of the second half of the run is within 4 MiB
   of the first half's (a trend; single readings move with the allocator). The tasks/s of this phase is
   the batched throughput of the whole system for one user.
2. *Many users* (100): as root, 100 accounts are made with ``useradd`` for the run
   (``tests/accounts.py`` names, removed after with everything left running as them);
   each, from its own client thread, at the same moment, submits a few no-op tasks, which
   starts its user endpoint (the deployment's default: a thread pool). Measured: the time
   until every user's first results are back (all ready), then every user submitting a
   batch at once (tasks/s over all users), the daemon's RSS and the total RSS of the
   daemon and everything it started. As another user the one account is this user, so
   the run uses 100 distinct user-endpoint *configurations* of it instead — and the
   daemon refuses to run work as its own uid (DESIGN §3.2), so this is reported as not
   measured rather than faked.

Every wait has a deadline; the daemon and the accounts are removed at the end.
Usage: python bench/scale.py [--smoke] [--users N] [--tasks N] [--json PATH]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    ENDPOINT,
    Stats,
    bench_deployment,
    cpu_seconds,
    descendants,
    fmt_bytes,
    fmt_rate,
    fmt_seconds,
    is_root,
    open_fds,
    print_table,
    rss_bytes,
    tree_rss,
    why_not_measured,
    write_json,
)

GROWTH_RSS_LIMIT = 4 * 1024 * 1024
ENDURANCE_CONFIG = {"engine": "ProcessPoolEngine", "max_workers": 2}


def noop() -> None:
    return None


class Caller:
    """One identity talking to the daemon over its own HTTP connection."""

    def __init__(self, url: str, token: str, config: dict[str, Any]) -> None:
        import httpx

        # Drop idle connections well before uvicorn's 5 s keep-alive timeout: a request
        # sent on a connection the server is closing fails with "connection reset".
        self.http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=120,
            limits=httpx.Limits(keepalive_expiry=1.0),
        )
        self.config = config
        self.function_id = ""

    def close(self) -> None:
        self.http.close()

    def register(self) -> None:
        from mepcore.client import pack_function

        _, body = pack_function(noop)
        r = self.http.post("/v1/functions", json={"function": base64.b64encode(body).decode()})
        r.raise_for_status()
        self.function_id = r.json()["function_id"]

    def submit(self, count: int, deadline: float) -> list[str]:
        from mepcore.client import pack_args

        args = base64.b64encode(pack_args((), {})).decode()
        body = {
            "user_endpoint_config": self.config,
            "tasks": [{"function_id": self.function_id, "args": args}] * count,
        }
        while True:
            r = self.http.post(f"/v1/endpoints/{ENDPOINT}/submit", json=body)
            if r.status_code == 429 and time.monotonic() < deadline:
                # Too many starts at once: wait as told (bounded by the deadline).
                time.sleep(min(float(r.headers.get("Retry-After", "1")), 2.0))
                continue
            if r.status_code != 200:
                raise RuntimeError(f"submit refused: {r.status_code} {r.text[:300]}")
            return list(r.json()["task_ids"])

    def wait(self, ids: Sequence[str], deadline: float) -> None:
        pending = set(ids)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(pending)} of {len(ids)} results missing")
            chunk = list(pending)[:5000]
            r = self.http.post(
                "/v1/tasks/wait", json={"task_ids": chunk, "timeout": min(5.0, left)}
            )
            r.raise_for_status()
            for view in r.json()["tasks"]:
                if view["state"] != "success":
                    raise RuntimeError(f"task {view['state']}: {view.get('error')}")
                pending.discard(view["task_id"])


# -- phase 1: endurance ------------------------------------------------------------------


def endurance(
    deployment: Any, tasks: int, batch: int, budget: float, warmup: int
) -> dict[str, Any]:
    caller = Caller(
        deployment.url, deployment.tokens(deployment.identities[:1])[0], ENDURANCE_CONFIG
    )
    pid = deployment.pid
    try:
        caller.register()
        end = time.monotonic() + budget
        # Warm-up: the user endpoint started, caches and pools at their working size.
        for _ in range(warmup):
            caller.wait(caller.submit(batch, end), end)
        base_rss, base_fds = rss_bytes(pid), open_fds(pid)
        checkpoints = [(0, base_rss, base_fds)]
        done = 0
        began = time.perf_counter()
        step = max(batch, tasks // 10)
        # Two batches in flight: one being run while the next is submitted.
        in_flight: list[list[str]] = []
        while done < tasks:
            if time.monotonic() > end:
                raise TimeoutError(f"budget of {budget:.0f} s spent after {done:,} tasks")
            count = min(batch, tasks - done - sum(len(b) for b in in_flight))
            if count > 0:
                in_flight.append(caller.submit(count, end))
            if len(in_flight) >= 2 or count <= 0:
                finished = in_flight.pop(0)
                caller.wait(finished, end)
                before = done
                done += len(finished)
                if done // step != before // step or done >= tasks:
                    checkpoints.append((done, rss_bytes(pid), open_fds(pid)))
        seconds = time.perf_counter() - began
        final_rss, final_fds = checkpoints[-1][1], checkpoints[-1][2]
        # Growth is a trend, not a step: the peak of the second half of the run against
        # the peak of the first half (allocator arenas and caches settle early on).
        half = len(checkpoints) // 2
        plateau = max(c[1] for c in checkpoints[half:]) - max(c[1] for c in checkpoints[:half])
        with contextlib.suppress(Exception):
            caller.http.post(f"/v1/endpoints/{ENDPOINT}/stop", json={})
        return {
            "tasks": done,
            "batch": batch,
            "seconds": seconds,
            "tasks_per_s": done / seconds,
            "rss_base_bytes": base_rss,
            "rss_final_bytes": final_rss,
            "rss_growth_bytes": final_rss - base_rss,
            "rss_trend_bytes": plateau,
            "fd_base": base_fds,
            "fd_final": final_fds,
            "fd_growth": final_fds - base_fds,
            "checkpoints": checkpoints,
        }
    finally:
        caller.close()


# -- phase 2: many users ----------------------------------------------------------------


def many_users(
    deployment: Any, users: int, first: int, batch: int, budget: float
) -> dict[str, Any]:
    root = is_root()
    if root:
        identities = deployment.identities[:users]
        configs: list[dict[str, Any]] = [{} for _ in identities]
        kind = "accounts"
    else:
        identities = deployment.identities[:users]
        # Distinct configurations of the one account: each its own user endpoint.
        configs = [
            {"idle_heartbeats_soft": 1 + i % 120, "max_workers": 1 + i // 120 % 8}
            for i in range(users)
        ]
        kind = "configurations of one account (not root)"
    tokens = deployment.tokens(identities)
    callers = [Caller(deployment.url, t, c) for t, c in zip(tokens, configs, strict=True)]
    pid = deployment.pid
    barrier = threading.Barrier(len(callers) + 1)
    ready_at: list[float | None] = [None] * len(callers)
    accepted_at: list[float | None] = [None] * len(callers)
    batch_done: list[float | None] = [None] * len(callers)
    errors: list[str] = []
    start_line = [0.0, 0.0]
    end = time.monotonic() + budget

    def user(index: int) -> None:
        caller = callers[index]
        try:
            caller.register()
        except Exception as exc:
            errors.append(f"register: {exc}")
        try:
            barrier.wait(timeout=budget)
            ids = caller.submit(first, end)
            accepted_at[index] = time.perf_counter()
            caller.wait(ids, end)
            ready_at[index] = time.perf_counter()
            barrier.wait(timeout=budget)
            ids = caller.submit(batch, end)
            caller.wait(ids, end)
            batch_done[index] = time.perf_counter()
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:
            errors.append(why_not_measured(exc))
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(len(callers))]
    for t in threads:
        t.start()
    result: dict[str, Any] = {"count": len(callers), "kind": kind, "ok": False}
    daemon_cpu_before = cpu_seconds(pid)
    try:
        barrier.wait(timeout=60)
        start_line[0] = time.perf_counter()
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=budget)
        start_line[1] = time.perf_counter()
        daemon_rss, total_rss = rss_bytes(pid), tree_rss(pid)
        below = descendants(pid)
        processes = len(below)
        # Where the time to "all ready" went: CPU used by the user endpoints (interpreter
        # start, imports, rendering) and by the daemon, against what two cores offer.
        result["uep_cpu_s"] = sum(cpu_seconds(p) for p in below)
        result["daemon_cpu_s"] = cpu_seconds(pid) - daemon_cpu_before
        for t in threads:
            t.join(max(0.0, end - time.monotonic()) + 5)
    except threading.BrokenBarrierError:
        daemon_rss, total_rss, processes = rss_bytes(pid), tree_rss(pid), len(descendants(pid))
    finally:
        for caller in callers:
            caller.close()
    ready = [r - start_line[0] for r in ready_at if r is not None]
    accepted = [a - start_line[0] for a in accepted_at if a is not None]
    finished = [d for d in batch_done if d is not None]
    result.update(
        {
            "ok": not errors and len(ready) == len(callers) and len(finished) == len(callers),
            "problem": errors[0] if errors else None,
            "errors": len(errors),
            "ready_count": len(ready),
            "ready_s": max(ready) if len(ready) == len(callers) else None,
            "ready": Stats.of(ready).to_dict() if ready else None,
            "accepted": Stats.of(accepted).to_dict() if accepted else None,
            "batch": batch,
            "tasks_per_s": (
                len(finished) * batch / (max(finished) - start_line[1])
                if finished and start_line[1]
                else None
            ),
            "daemon_rss_bytes": daemon_rss,
            "total_rss_bytes": total_rss,
            "processes": processes,
        }
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3 users, 2,000 tasks (tests)")
    parser.add_argument("--users", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    users = args.users or (3 if args.smoke else 100)
    tasks = args.tasks or (2_000 if args.smoke else 100_000)
    batch = 500 if args.smoke else 5_000
    figures: dict[str, Any] = {}
    try:
        with bench_deployment(
            users if is_root() else 1,
            limits={"concurrent_starts": users, "endpoints_per_user": users + 1},
        ) as deployment:
            figures["accounts"] = sorted(set(deployment.accounts)) if is_root() else []
            figures["uids"] = sorted(deployment.uids)
            try:
                figures["endurance"] = endurance(
                    deployment, tasks, batch, budget=150, warmup=2 if args.smoke else 4
                )
            except Exception as exc:
                figures["endurance"] = {"problem": why_not_measured(exc)}
            if not is_root():
                deployment.identities = [f"mept{i:08x}@example.org" for i in range(users)]
            try:
                figures["users"] = many_users(deployment, users, 5, 100, budget=90)
            except Exception as exc:
                figures["users"] = {"problem": why_not_measured(exc)}
            failed = figures["users"].get("problem") or figures["endurance"].get("problem")
            if failed and deployment.log_tail():
                print(f"daemon log (end):\n{deployment.log_tail()}", file=sys.stderr)
    except Exception as exc:
        problem = f"no daemon: {type(exc).__name__}: {str(exc)[:300]}"
        figures.setdefault("endurance", {"problem": problem})
        figures.setdefault("users", {"problem": problem})
    report(figures, users, tasks)
    write_json(args.json, figures)
    ok = figures["endurance"].get("tasks") and figures["users"].get("ok")
    # Not root: the daemon refuses its own uid on purpose; the table says so, not a failure.
    return 0 if ok or not is_root() else 1


def no_growth(e: dict[str, Any]) -> bool:
    return bool(e["fd_growth"] <= 0 and e["rss_trend_bytes"] <= GROWTH_RSS_LIMIT)


def report(figures: dict[str, Any], users: int, tasks: int) -> None:
    e, u = figures["endurance"], figures["users"]
    rows: list[list[str]] = []
    if e.get("tasks"):
        rows += [
            ["endurance", f"no-op tasks (one user, batches of {e['batch']})", f"{e['tasks']:,}"],
            ["endurance", "throughput, batched HTTP", fmt_rate(e["tasks_per_s"], " tasks/s")],
            [
                "endurance",
                "daemon RSS after warm-up → after run",
                f"{fmt_bytes(e['rss_base_bytes'])} → {fmt_bytes(e['rss_final_bytes'])}"
                f" ({e['rss_growth_bytes'] / 1048576:+.1f} MiB)",
            ],
            [
                "endurance",
                "daemon open fds after warm-up → after run",
                f"{e['fd_base']} → {e['fd_final']} ({e['fd_growth']:+d})",
            ],
            [
                "endurance",
                "daemon RSS at each tenth (MiB)",
                " ".join(f"{c[1] / 1048576:.0f}" for c in e["checkpoints"]),
            ],
            [
                "endurance",
                "growth",
                ("none" if no_growth(e) else "**GROWTH**")
                + f" (RSS peak, second half vs first half: {e['rss_trend_bytes'] / 1048576:+.1f}"
                " MiB)",
            ],
        ]
    else:
        rows.append(["endurance", f"{tasks:,} tasks", f"not measured: {e.get('problem')}"])
    if u.get("ready") is not None or u.get("ok"):
        ready = u["ready"]
        rows += [
            ["users", "users started at once", f"{u['count']} {u['kind']}"],
            [
                "users",
                "all ready (first results of every user)",
                fmt_seconds(u["ready_s"])
                if u["ready_s"] is not None
                else f"{u['ready_count']} of {u['count']} ready",
            ],
            [
                "users",
                "ready, per user min / p50 / p95 / max",
                " / ".join(fmt_seconds(ready[k]) for k in ("min", "p50", "p95", "max")),
            ],
            [
                "users",
                "submit accepted (endpoint started), p50 / max",
                " / ".join(fmt_seconds(u["accepted"][k]) for k in ("p50", "max"))
                if u["accepted"]
                else "-",
            ],
            [
                "users",
                f"tasks/s, every user a batch of {u['batch']} at once",
                fmt_rate(u["tasks_per_s"], " tasks/s"),
            ],
            [
                "users",
                "CPU used until all ready: user endpoints / daemon",
                f"{u.get('uep_cpu_s', 0):.1f} s / {u.get('daemon_cpu_s', 0):.1f} s"
                f" ({os.cpu_count()} CPUs)",
            ],
            ["users", "daemon RSS", fmt_bytes(u["daemon_rss_bytes"])],
            [
                "users",
                "total RSS (daemon + user endpoints + workers)",
                f"{fmt_bytes(u['total_rss_bytes'])} in {u['processes'] + 1} processes",
            ],
        ]
        if u.get("problem"):
            rows.append(["users", f"errors ({u['errors']})", u["problem"]])
    else:
        rows.append(["users", f"{users} users", f"not measured: {u.get('problem')}"])
    print_table(
        "Scale: many users at once; daemon memory and descriptors over many tasks",
        ["phase", "measure", "value"],
        rows,
        [
            "the daemon and every user endpoint run on this 2-core machine with the clients",
            "RSS counts shared pages once per process (an upper bound of the real total)",
            "growth: fds back to the warm-up count, and the RSS peak of the run's second half"
            f" within {GROWTH_RSS_LIMIT // 1048576} MiB of the first half's (a trend, not noise)",
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
