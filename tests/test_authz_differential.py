"""Differential tests: the indexed, cached authorizer against a plain casbin.Enforcer.

Random policies and random requests over small vocabularies (so that lines collide,
roles chain and patterns overlap); the plain enforcer gets the same model text and
policy text, the same conditions function, and an independently written
``segmentMatch`` (segment-by-segment recursion instead of a regular expression).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mepcore.authz import MODEL_TEXT, Authorizer, AuthzRequest, conditions_hold
from mepcore.authz.reference import build_enforcer, enforce
from mepcore.testing import FakeClock


def reference_segment_match(value: str, pattern: str) -> bool:
    """Whole-segment matching written without regular expressions."""

    def match(vs: list[str], ps: list[str]) -> bool:
        if not ps:
            return not vs
        head, rest = ps[0], ps[1:]
        if head == "**":
            return any(all(vs[:k]) and match(vs[k:], rest) for k in range(1, len(vs) + 1))
        if not vs:
            return False
        if head == "*":
            return vs[0] != "" and match(vs[1:], rest)
        return vs[0] == head and match(vs[1:], rest)

    return match(value.split(":"), pattern.split(":"))


FUNCTIONS = {"segmentMatch": reference_segment_match, "conditionsHold": conditions_hold}

PRINCIPALS = ["id:a", "id:b", "group:x", "group:y", "domain:c.edu", "user:u", "username:u@c.edu"]
ROLES = ["role:r1", "role:r2", "role:r3"]
ENDPOINTS = ["hpc", "gpu", "ep:prod", "ep:prod:a", "ep:production-evil"]
OBJECTS = ["endpoint", "template:gpu", "function:f1", "function:f2", "task:1", "user:u"]
SETS = ["fset:s1", "fset:s2", "fset:s3"]
SUBJECT_PATTERNS = ["*", "**", "id:*", "*:*", "group:*", "domain:**", "role:*"]
ENDPOINT_PATTERNS = ["*", "**", "ep:*", "ep:**", "ep:prod:*", "*:prod"]
OBJECT_PATTERNS = ["*", "**", "function:*", "template:*", "fset:*", "*:gpu"]
# A few actions only, so that random lines and requests meet often.
ACTIONS_USED = ["submit_task", "read_status", "admin"]
CONDITIONS = [
    "-",
    "-",
    "-",
    "",
    "mfa",
    "auth_age_le:60",
    "auth_age_le:3600",
    "uid_ge:1000",
    "hours:02-04",
    "hours:22-06",
    "mfa;uid_ge:1000",
    "auth_age_le:60;hours:09-17",
]

p_lines = st.builds(
    lambda sub, dom, obj, act, cond, eft: f"p, {sub}, {dom}, {obj}, {act}, {cond}, {eft}",
    st.sampled_from(PRINCIPALS + ROLES + SUBJECT_PATTERNS),
    st.sampled_from(ENDPOINTS + ENDPOINT_PATTERNS),
    st.sampled_from(OBJECTS + SETS + OBJECT_PATTERNS),
    st.sampled_from([*ACTIONS_USED, "*"]),
    st.sampled_from(CONDITIONS),
    st.sampled_from(["allow", "allow", "deny"]),
)
g_lines = st.builds(
    lambda member, role, dom: f"g, {member}, {role}, {dom}",
    st.sampled_from(PRINCIPALS + ROLES),
    st.sampled_from(ROLES),
    st.sampled_from(ENDPOINTS),
)
g2_lines = st.builds(
    lambda member, group: f"g2, {member}, {group}",
    st.sampled_from(OBJECTS + SETS),
    st.sampled_from(SETS),
)
policies = st.lists(st.one_of(p_lines, p_lines, g_lines, g2_lines), min_size=3, max_size=40).map(
    lambda lines: "# random policy\n" + "\n".join(lines) + "\n"
)
requests = st.builds(
    AuthzRequest,
    endpoint=st.sampled_from([*ENDPOINTS, "other"]),
    obj=st.sampled_from(OBJECTS + SETS + ["function:f3", "fset:s1:x"]),
    action=st.sampled_from(ACTIONS_USED),
    principals=st.lists(st.sampled_from(PRINCIPALS + ROLES), max_size=4).map(tuple),
    mfa=st.booleans(),
    auth_age=st.sampled_from([None, 0, 30, 60, 60.5, 3600, 5000]),
    uid=st.sampled_from([None, 0, 999, 1000, 5000]),
)


def _matching(values: list[str], pattern: str) -> list[str]:
    return [v for v in values if v == pattern or reference_segment_match(v, pattern)]


@st.composite
def aimed_request(draw: st.DrawFn, policy: str) -> AuthzRequest:
    """A request built from one of the policy's p lines, so that it (nearly) matches."""
    lines = [line.split(", ") for line in policy.splitlines() if line.startswith("p, ")]
    if not lines:
        return draw(requests)
    _, sub, dom, obj, act, _, _ = draw(st.sampled_from(lines))
    links = [ln.split(", ") for ln in policy.splitlines() if ln.startswith("g")]
    endpoint = draw(st.sampled_from(_matching(ENDPOINTS, dom) or ENDPOINTS))
    subject_pool = _matching(PRINCIPALS, sub) + [
        ln[1] for ln in links if ln[0] == "g" and ln[2] == sub and ln[3] == endpoint
    ]
    principals = draw(st.lists(st.sampled_from(subject_pool or PRINCIPALS), max_size=2))
    principals += draw(st.lists(st.sampled_from(PRINCIPALS), max_size=2))
    object_pool = _matching(OBJECTS + SETS, obj) + [
        ln[1] for ln in links if ln[0] == "g2" and ln[2] == obj
    ]
    return AuthzRequest(
        endpoint=endpoint,
        obj=draw(st.sampled_from(object_pool or OBJECTS)),
        action=act if act != "*" else draw(st.sampled_from(ACTIONS_USED)),
        principals=tuple(principals),
        mfa=draw(st.booleans()),
        auth_age=draw(st.sampled_from([None, 0, 30, 60, 60.5, 3600, 5000])),
        uid=draw(st.sampled_from([None, 0, 999, 1000, 5000])),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), policy=policies)
def test_decisions_equal_plain_casbin(data: st.DataObject, policy: str) -> None:
    batch = data.draw(
        st.lists(
            st.tuples(
                st.one_of(requests, aimed_request(policy), aimed_request(policy)),
                st.integers(0, 30),
            ),
            min_size=1,
            max_size=12,
        )
    )
    clock = FakeClock(wall=1_700_000_000.0)
    authorizer = Authorizer.from_text(MODEL_TEXT, policy, clock=clock)
    enforcer = build_enforcer(MODEL_TEXT, [policy], functions=FUNCTIONS)
    # Every request twice (the second from the cache), the clock moving by whole hours
    # in between so that time-dependent lines must not be answered from a stale entry.
    for request, hours in batch + batch:
        clock.advance(hours * 3600)
        expected = enforce(
            enforcer,
            request.endpoint,
            request.obj,
            request.action,
            request.principals,
            authorizer.context(request),
        )
        decision = authorizer.decide(request)
        assert decision.allowed is expected, (policy, request, decision)
        assert authorizer.decide_uncached(request).allowed is expected
        assert decision.allowed == (decision.reason == "authz.allowed")
        event(decision.reason)


@pytest.mark.parametrize("depth", range(7, 13))
def test_role_chains_as_deep_as_casbin_searches(depth: int) -> None:
    """Membership through long chains of g and g2 links counts exactly as far as in Casbin."""
    roles = [f"role:r{i}" for i in range(depth + 1)]
    sets = [f"fset:s{i}" for i in range(depth + 1)]
    lines = [f"g, {roles[i]}, {roles[i + 1]}, hpc" for i in range(depth)]
    lines += [f"g2, {sets[i]}, {sets[i + 1]}" for i in range(depth)]
    lines += ["g, id:a, role:r0, hpc", "g2, function:f, fset:s0"]
    lines += [f"p, {roles[-1]}, hpc, endpoint, read_status, -, allow"]
    lines += [f"p, id:b, hpc, {sets[-1]}, submit_task, -, allow"]
    policy = "\n".join(lines)
    authorizer = Authorizer.from_text(MODEL_TEXT, policy, clock=FakeClock())
    enforcer = build_enforcer(MODEL_TEXT, [policy], functions=FUNCTIONS)
    for request in (
        AuthzRequest("hpc", "endpoint", "read_status", ("id:a",)),
        AuthzRequest("hpc", "endpoint", "read_status", ("role:r0",)),
        AuthzRequest("hpc", "function:f", "submit_task", ("id:b",)),
        AuthzRequest("hpc", "fset:s0", "submit_task", ("id:b",)),
    ):
        expected = enforce(
            enforcer,
            request.endpoint,
            request.obj,
            request.action,
            request.principals,
            authorizer.context(request),
        )
        assert authorizer.decide(request).allowed is expected


def test_reference_segment_match_agrees_with_shipped() -> None:
    from mepcore.authz import segment_match

    values = ["a", "a:b", "a:b:c", "a::b", "ep:prod", "ep:production-evil", "ep:prod:x", ""]
    patterns = ["*", "**", "a:*", "a:**", "*:b", "**:c", "ep:prod:*", "ep:*", "a::b", "a"]
    for value in values:
        for pattern in patterns:
            assert segment_match(value, pattern) is reference_segment_match(value, pattern), (
                value,
                pattern,
            )
