"""Decision latency of mepcore.authz.Authorizer against a plain casbin.Enforcer.

For policies of 10, 1,000, 10,000 and 100,000 lines (endpoints, roles per endpoint,
function sets, patterns, conditions, a few deny lines), prints p50/p99 of:
  - Authorizer.decide on distinct requests (every call a cache miss: the index path),
  - Authorizer.decide on one repeated request (the cache path),
  - casbin.Enforcer.enforce on the same model, policy and requests (few samples at
    large sizes: it evaluates every line per call),
and the ratio casbin p50 / Authorizer cold p50. It also checks that every sampled
request got the same answer from both. Usage: python bench/authz.py [--smoke]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

from mepcore.authz import MODEL_TEXT, Authorizer, AuthzRequest
from mepcore.authz.reference import build_enforcer, enforce

ACTIONS = ["start_endpoint", "submit_task", "read_result", "stop_endpoint", "read_status"]


def make_policy(size: int, rng: random.Random) -> str:
    endpoints = max(2, size // 40)
    people = max(4, size // 5)
    groups = max(2, size // 200)
    lines: list[str] = []
    while len(lines) < size:
        kind = rng.random()
        ep = f"ep{rng.randrange(endpoints)}"
        if kind < 0.20:
            lines.append(f"g, id:{rng.randrange(people)}, role:r{rng.randrange(5)}, {ep}")
        elif kind < 0.30:
            lines.append(f"g2, function:{rng.getrandbits(64):016x}, fset:s{rng.randrange(20)}")
        else:
            subject = rng.choice(
                [
                    f"id:{rng.randrange(people)}",
                    f"group:g{rng.randrange(groups)}",
                    f"role:r{rng.randrange(5)}",
                    "domain:campus.edu",
                ]
            )
            endpoint = ep if rng.random() < 0.9 else rng.choice(["*", "ep:prod:*", "**"])
            obj = rng.choice(
                [
                    "endpoint",
                    f"template:t{rng.randrange(8)}",
                    f"fset:s{rng.randrange(20)}",
                    "function:*",
                    f"function:{rng.getrandbits(64):016x}",
                    "**",
                ]
            )
            act = rng.choice([*ACTIONS, "*"])
            cond = rng.choice(["-", "-", "-", "mfa", "auth_age_le:3600", "uid_ge:1000"])
            eft = "deny" if rng.random() < 0.05 else "allow"
            lines.append(f"p, {subject}, {endpoint}, {obj}, {act}, {cond}, {eft}")
    return "\n".join(lines) + "\n"


def make_requests(policy: str, count: int, rng: random.Random) -> list[AuthzRequest]:
    rules = [ln.split(", ") for ln in policy.splitlines() if ln.startswith("p, ")]
    out = []
    for i in range(count):
        _, sub, dom, obj, act, _, _ = rng.choice(rules)
        principals = [
            f"id:{rng.randrange(10**6)}",
            f"group:g{rng.randrange(50)}",
            "domain:campus.edu",
            f"user:u{i}",
        ]
        if ":" in sub and "*" not in sub:
            principals.append(sub)
        out.append(
            AuthzRequest(
                endpoint=dom if "*" not in dom else f"ep{rng.randrange(50)}",
                obj=obj if "*" not in obj else f"function:{rng.getrandbits(64):016x}",
                action=act if act != "*" else rng.choice(ACTIONS),
                principals=tuple(principals),
                mfa=rng.random() < 0.5,
                auth_age=rng.choice([None, 10.0, 5000.0]),
                uid=rng.choice([None, 500, 1500]),
            )
        )
    return out


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = statistics.median(ordered) / 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000
    return p50, p99


def fmt(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.1f} µs"


def run(size: int, samples: int, casbin_budget_s: float, rng: random.Random) -> list[str]:
    policy = make_policy(size, rng)
    authorizer = Authorizer.from_text(MODEL_TEXT, policy, cache_size=0)
    requests = make_requests(policy, samples, rng)
    cold = []
    for request in requests:
        start = time.perf_counter_ns()
        authorizer.decide(request)
        cold.append(time.perf_counter_ns() - start)

    cached = Authorizer.from_text(MODEL_TEXT, policy)
    repeated_request = requests[0]
    cached.decide(repeated_request)
    repeated = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        cached.decide(repeated_request)
        repeated.append(time.perf_counter_ns() - start)

    enforcer = build_enforcer(MODEL_TEXT, [policy])
    plain: list[int] = []
    mismatches = 0
    allowed = 0
    deadline = time.monotonic() + casbin_budget_s
    for request in requests:
        if len(plain) >= 3 and time.monotonic() > deadline:
            break
        ctx = authorizer.context(request)
        start = time.perf_counter_ns()
        expected = enforce(
            enforcer, request.endpoint, request.obj, request.action, request.principals, ctx
        )
        plain.append(time.perf_counter_ns() - start)
        ours = authorizer.decide(request).allowed
        mismatches += ours is not expected
        allowed += expected

    c50, c99 = percentiles(cold)
    r50, r99 = percentiles(repeated)
    p50, p99 = percentiles(plain)
    return [
        f"{size:,}",
        fmt(c50),
        fmt(c99),
        fmt(r50),
        fmt(r99),
        fmt(p50),
        fmt(p99),
        f"{p50 / c50:,.0f}x",
        f"{len(plain)}",
        f"{allowed}/{len(plain)}",
        str(mismatches),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    rng = random.Random(20240501)
    if args.smoke:
        sizes, samples, budget = [10, 200], 200, 0.2
    else:
        sizes, samples, budget = [10, 1_000, 10_000, 100_000], 2_000, 4.0
    header = [
        "lines",
        "decide p50",
        "decide p99",
        "repeat p50",
        "repeat p99",
        "casbin p50",
        "casbin p99",
        "ratio p50",
        "casbin n",
        "allowed",
        "mismatch",
    ]
    rows = [header]
    for size in sizes:
        rows.append(run(size, samples, budget, rng))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))
        if n == 0:
            print("  ".join("-" * width for width in widths))
    print(
        f"\ndecide: distinct requests, {samples} each; repeat: one request {samples} times "
        "(cached); casbin: plain Enforcer, same model/policy/requests, time-boxed samples."
    )
    failed = any(row[-1] != "0" for row in rows[1:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
