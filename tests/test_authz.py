"""Unit tests of mepcore.authz: the semantics of the shipped model, loading and reload."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from mepcore.authz import (
    ACTIONS,
    MODEL_TEXT,
    Authorizer,
    AuthorizerHolder,
    AuthzRequest,
    Decision,
    check_model,
    principals_of,
    segment_match,
)
from mepcore.errors import AuthzConfigError, AuthzError
from mepcore.testing import FakeClock
from mepcore.types import Account, Identity, IdentitySet

REPO = Path(__file__).resolve().parent.parent

NOON_UTC = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC).timestamp()


def authorizer(policy: str, clock: FakeClock | None = None) -> Authorizer:
    return Authorizer.from_text(MODEL_TEXT, policy, clock=clock or FakeClock(wall=NOON_UTC))


def req(
    *principals: str,
    endpoint: str = "hpc",
    obj: str = "endpoint",
    action: str = "start_endpoint",
    **attrs: object,
) -> AuthzRequest:
    return AuthzRequest(endpoint, obj, action, principals, **attrs)  # type: ignore[arg-type]


# --- default deny and effects ---------------------------------------------------------


def test_empty_policy_denies() -> None:
    decision = authorizer("").decide(req("id:a"))
    assert decision == Decision(False, "authz.denied", (), decision.policy_version)


def test_anything_not_allowed_is_denied() -> None:
    az = authorizer("p, id:a, hpc, endpoint, start_endpoint, -, allow\n")
    assert az.decide(req("id:a")).allowed
    assert not az.decide(req("id:b")).allowed
    assert not az.decide(req("id:a", endpoint="gpu")).allowed
    assert not az.decide(req("id:a", action="stop_endpoint")).allowed
    assert not az.decide(req("id:a", obj="template:gpu")).allowed
    assert az.decide(req("id:b")).reason == "authz.denied"


def test_deny_overrides_allow_in_any_order() -> None:
    allow = "p, group:staff, hpc, endpoint, start_endpoint, -, allow"
    deny = "p, id:a, *, **, *, -, deny"
    for policy in (f"{allow}\n{deny}\n", f"{deny}\n{allow}\n"):
        az = authorizer(policy)
        decision = az.decide(req("id:a", "group:staff"))
        assert not decision.allowed
        assert decision.reason == "authz.explicit_deny"
        assert [str(line) for line in decision.lines] == [deny]
        assert az.decide(req("id:b", "group:staff")).allowed


def test_allowed_decision_names_its_line() -> None:
    az = authorizer("# comment\n\np, id:a, hpc, endpoint, start_endpoint, -, allow\n")
    decision = az.decide(req("id:a"))
    assert decision.reason == "authz.allowed"
    (line,) = decision.lines
    assert not isinstance(line, str)
    assert (line.source, line.lineno) == ("<policy>", 3)
    assert decision.to_dict()["lines"] == [
        {
            "source": "<policy>",
            "line": 3,
            "text": "p, id:a, hpc, endpoint, start_endpoint, -, allow",
        }
    ]
    assert decision.policy_version == az.version
    assert az.version.startswith("sha256:")


def test_version_follows_the_policy_text() -> None:
    one = authorizer("p, id:a, hpc, endpoint, start_endpoint, -, allow\n")
    same = authorizer("p, id:a, hpc, endpoint, start_endpoint, -, allow\n")
    other = authorizer("p, id:b, hpc, endpoint, start_endpoint, -, allow\n")
    assert one.version == same.version != other.version


def test_wildcard_action() -> None:
    az = authorizer("p, id:admin, hpc, **, *, -, allow\n")
    for action in ACTIONS:
        assert az.decide(req("id:admin", action=action, obj="task:1")).allowed


# --- roles and sets ---------------------------------------------------------------------


def test_roles_are_per_endpoint() -> None:
    az = authorizer(
        "p, role:admin, hpc, **, admin, -, allow\n"
        "p, role:admin, gpu, **, admin, -, allow\n"
        "g, id:alice, role:admin, hpc\n"
    )
    assert az.decide(req("id:alice", action="admin")).allowed
    # The same role name on another endpoint's lines does not follow alice there.
    assert not az.decide(req("id:alice", action="admin", endpoint="gpu")).allowed


def test_role_granted_in_one_endpoint_does_not_leak_through_a_pattern_line() -> None:
    az = authorizer("p, role:admin, *, **, admin, -, allow\ng, id:alice, role:admin, hpc\n")
    assert az.decide(req("id:alice", action="admin", endpoint="hpc")).allowed
    assert not az.decide(req("id:alice", action="admin", endpoint="gpu")).allowed


def test_roles_inherit_within_an_endpoint() -> None:
    az = authorizer(
        "p, role:user, hpc, endpoint, start_endpoint, -, allow\n"
        "g, role:admin, role:user, hpc\n"
        "g, group:ops, role:admin, hpc\n"
    )
    assert az.decide(req("id:x", "group:ops")).allowed
    assert not az.decide(req("id:x", "group:ops", endpoint="gpu")).allowed


def test_function_sets() -> None:
    f1, f2, f3 = ("function:" + c * 64 for c in "abc")
    az = authorizer(
        "p, domain:campus.edu, *, fset:approved, submit_task, -, allow\n"
        f"g2, {f1}, fset:approved\n"
        f"g2, {f2}, fset:approved\n"
        f"g2, {f3}, fset:retired\n"
    )
    who = ("id:x", "domain:campus.edu")
    assert az.decide(req(*who, obj=f1, action="submit_task")).allowed
    assert az.decide(req(*who, obj=f2, action="submit_task", endpoint="gpu")).allowed
    assert not az.decide(req(*who, obj=f3, action="submit_task")).allowed
    assert not az.decide(req("id:x", "domain:other.edu", obj=f1, action="submit_task")).allowed


# --- predicates, with a fake clock ---------------------------------------------------------


def test_mfa_predicate() -> None:
    az = authorizer("p, group:gpu, hpc, template:gpu, start_endpoint, mfa, allow\n")
    asked = {"obj": "template:gpu"}
    assert az.decide(req("group:gpu", mfa=True, **asked)).allowed
    decision = az.decide(req("group:gpu", mfa=False, **asked))
    assert (decision.allowed, decision.reason) == (False, "authz.condition_failed")


def test_auth_age_predicate_boundaries() -> None:
    az = authorizer("p, id:a, hpc, endpoint, start_endpoint, auth_age_le:3600, allow\n")
    assert az.decide(req("id:a", auth_age=0)).allowed
    assert az.decide(req("id:a", auth_age=3600)).allowed
    assert not az.decide(req("id:a", auth_age=3600.5)).allowed
    assert not az.decide(req("id:a", auth_age=None)).allowed
    # Cached answers do not leak between ages on different sides of the threshold.
    assert az.decide(req("id:a", auth_age=10)).allowed
    assert not az.decide(req("id:a", auth_age=4000)).allowed


def test_uid_predicate_boundaries() -> None:
    az = authorizer("p, **, hpc, endpoint, start_endpoint, uid_ge:1000, allow\n")
    assert az.decide(req("id:a", uid=1000)).allowed
    assert az.decide(req("id:a", uid=65000)).allowed
    assert not az.decide(req("id:a", uid=999)).allowed
    assert not az.decide(req("id:a", uid=None)).allowed


def test_hours_predicate_follows_the_injected_clock() -> None:
    clock = FakeClock(wall=datetime.datetime(2024, 5, 1, 1, 30, tzinfo=datetime.UTC).timestamp())
    az = authorizer("p, **, hpc, endpoint, start_endpoint, hours:02-04, allow\n", clock)
    seen = []
    for _ in range(5):  # 01:30, 02:30, 03:30, 04:30, 05:30 — the same request each time
        seen.append(az.decide(req("id:a")).allowed)
        clock.advance(3600)
    assert seen == [False, True, True, False, False]


def test_hours_window_across_midnight() -> None:
    clock = FakeClock(wall=datetime.datetime(2024, 5, 1, 21, 0, tzinfo=datetime.UTC).timestamp())
    az = authorizer(
        "p, **, hpc, endpoint, start_endpoint, hours:22-06, deny\n"
        "p, **, hpc, endpoint, start_endpoint, -, allow\n",
        clock,
    )
    seen = []
    for _ in range(10):  # 21:00 … 06:00
        seen.append(az.decide(req("id:a")).allowed)
        clock.advance(3600)
    assert seen == [True] + [False] * 8 + [True]


def test_hours_in_another_timezone() -> None:
    clock = FakeClock(wall=datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC).timestamp())
    tz = datetime.timezone(datetime.timedelta(hours=-9))
    az = Authorizer.from_text(
        MODEL_TEXT,
        "p, **, hpc, endpoint, start_endpoint, hours:02-04, allow\n",
        clock=clock,
        timezone=tz,
    )
    assert az.decide(req("id:a")).allowed  # 03:00 at UTC-9


def test_several_predicates_must_all_hold() -> None:
    az = authorizer("p, group:gpu, hpc, endpoint, start_endpoint, mfa;auth_age_le:3600, allow\n")
    assert az.decide(req("group:gpu", mfa=True, auth_age=5)).allowed
    assert not az.decide(req("group:gpu", mfa=True, auth_age=7200)).allowed
    assert not az.decide(req("group:gpu", mfa=False, auth_age=5)).allowed


@pytest.mark.parametrize("cond", ["", "-"])
def test_empty_condition_means_none(cond: str) -> None:
    az = authorizer(f"p, id:a, hpc, endpoint, start_endpoint, {cond}, allow\n")
    assert az.decide(req("id:a")).allowed


# --- load-time refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cond",
    [
        "sudo",
        "mfa:yes",
        "auth_age_le:",
        "auth_age_le:-1",
        "auth_age_le:1h",
        "uid_ge:abc",
        "hours:2",
        "hours:05-05",
        "hours:25-26",
        "mfa;;uid_ge:1",
        "MFA",
    ],
)
def test_unknown_or_malformed_predicate_refused_at_load(cond: str) -> None:
    policy = "p, id:a, hpc, endpoint, start_endpoint, -, allow\n" + (
        f"p, id:a, hpc, endpoint, start_endpoint, {cond}, allow\n"
    )
    with pytest.raises(AuthzConfigError) as info:
        Authorizer.from_text(MODEL_TEXT, policy, source="site.csv")
    assert info.value.reason == "authz.policy_invalid"
    assert "site.csv:2:" in str(info.value)
    assert info.value.context["line"] == 2


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("p, id:a, hpc, endpoint, start_endpoint, allow", "fields"),
        ("p, id:a, hpc, endpoint, start_endpoint, -, allow, extra", "fields"),
        ("q, id:a, hpc", "line type"),
        ("p, id:a, hpc, endpoint, launch, -, allow", "unknown action"),
        ("p, id:a, hpc, endpoint, start_endpoint, -, permit", "allow or deny"),
        ("p, id a, hpc, endpoint, start_endpoint, -, allow", "forbidden characters"),
        ("p, id:(a), hpc, endpoint, start_endpoint, -, allow", "forbidden characters"),
        ("p, , hpc, endpoint, start_endpoint, -, allow", "forbidden characters"),
        ("p, id:a, hpc, endpoint, start_endpoint, -, allow # trailing", "forbidden"),
        ("g, id:*, role:admin, hpc", "literal"),
        ("g2, function:*, fset:all", "literal"),
        ("g, id:a, role:admin", "fields"),
    ],
)
def test_malformed_line_refused_with_its_number(line: str, why: str) -> None:
    policy = "# site policy\np, id:a, hpc, endpoint, start_endpoint, -, allow\n\n" + line + "\n"
    with pytest.raises(AuthzConfigError) as info:
        Authorizer.from_text(MODEL_TEXT, policy, source="site.csv")
    assert str(info.value).startswith("authz.policy_invalid: site.csv:4: ")
    assert why in str(info.value)


def test_other_models_are_refused() -> None:
    check_model((REPO / "policies" / "model.conf").read_text())
    permissive = MODEL_TEXT.replace("&& conditionsHold(p.cond, r.ctx)", "|| true")
    for model in (permissive, "[request_definition]\nr = sub, obj, act\n", "garbage ["):
        with pytest.raises(AuthzConfigError) as info:
            Authorizer.from_text(model, "")
        assert info.value.reason == "authz.model_invalid"


def test_from_files_reports_unreadable_files(tmp_path: Path) -> None:
    model = tmp_path / "model.conf"
    model.write_text(MODEL_TEXT)
    with pytest.raises(AuthzConfigError) as info:
        Authorizer.from_files(model, tmp_path / "missing.csv")
    assert "missing.csv" in str(info.value)


# --- the prefix trick -----------------------------------------------------------------------


def test_glued_wildcard_is_refused_at_load() -> None:
    for pattern in ("ep:prod*", "ep:*prod", "ep:p*d", "***", "id:abc*"):
        policy = f"p, {pattern}, {pattern}, {pattern}, start_endpoint, -, allow\n"
        with pytest.raises(AuthzConfigError, match="whole ':'-separated segment"):
            Authorizer.from_text(MODEL_TEXT, policy)


def test_segment_wildcard_does_not_match_a_longer_name() -> None:
    az = authorizer(
        "p, **, ep:prod:*, endpoint, start_endpoint, -, allow\n"
        "p, **, ep:prod, endpoint, stop_endpoint, -, allow\n"
        "p, id:*, staging, endpoint, read_status, -, allow\n"
    )
    assert az.decide(req("id:a", endpoint="ep:prod:a")).allowed
    for endpoint in ("ep:production-evil", "ep:prod", "ep:prod:a:b", "ep:prod:", "xep:prod:a"):
        assert not az.decide(req("id:a", endpoint=endpoint)).allowed, endpoint
    assert az.decide(req("id:a", endpoint="ep:prod", action="stop_endpoint")).allowed
    assert not az.decide(req("id:a", endpoint="ep:production-evil", action="stop_endpoint")).allowed
    assert not az.decide(req("id:a:b", endpoint="staging", action="read_status")).allowed
    assert not az.decide(req("xid:a", endpoint="staging", action="read_status")).allowed


def test_segment_match_is_anchored() -> None:
    assert segment_match("ep:prod:a", "ep:prod:*")
    assert not segment_match("ep:production-evil", "ep:prod:*")
    assert not segment_match("ep:production-evil", "ep:prod")
    assert not segment_match("ep:production-evil", "ep:prod*")  # '*' glued: literal
    assert segment_match("a:b:c", "a:**")
    assert not segment_match("a", "a:**")
    assert not segment_match("a::b", "**")
    assert not segment_match("x.y", "x*y")


# --- requests, cache, explain ------------------------------------------------------------


def test_invalid_requests_raise_request_invalid() -> None:
    bad: list[dict[str, object]] = [
        {"action": "launch"},
        {"endpoint": ""},
        {"obj": "a\nb"},
        {"principals": "id:a"},
        {"mfa": "yes"},
        {"auth_age": -1},
        {"auth_age": float("nan")},
        {"uid": True},
        {"uid": -5},
    ]
    for change in bad:
        fields: dict[str, object] = {
            "endpoint": "hpc",
            "obj": "endpoint",
            "action": "read_status",
            "principals": ("id:a",),
        }
        fields.update(change)
        with pytest.raises(AuthzError) as info:
            AuthzRequest(**fields)  # type: ignore[arg-type]
        assert info.value.reason == "authz.request_invalid", change


def test_request_from_mapping() -> None:
    data = {"endpoint": "hpc", "obj": "endpoint", "action": "read_status", "principals": ["id:a"]}
    assert AuthzRequest.from_mapping(data) == AuthzRequest(
        "hpc", "endpoint", "read_status", ("id:a",)
    )
    with pytest.raises(AuthzError, match="request_invalid"):
        AuthzRequest.from_mapping({**data, "extra": 1})
    with pytest.raises(AuthzError, match="request_invalid"):
        AuthzRequest.from_mapping({**data, "uid": "1000"})


def test_cache_is_bounded() -> None:
    az = Authorizer.from_text(
        MODEL_TEXT, "p, id:*, hpc, endpoint, read_status, -, allow\n", cache_size=8
    )
    for i in range(50):
        assert az.decide(req(f"id:{i}", action="read_status")).allowed
    assert len(az._cache) == 8


def test_explain_lists_the_links_used() -> None:
    az = authorizer(
        "p, role:admin, hpc, fset:ok, submit_task, -, allow\n"
        "g, id:a, role:admin, hpc\n"
        "g, id:b, role:admin, hpc\n"
        "g2, function:f, fset:ok\n"
    )
    explanation = az.explain(req("id:a", obj="function:f", action="submit_task"))
    assert explanation.decision.allowed
    assert [line.lineno for line in explanation.touched] == [1, 2, 4]


# --- reload -----------------------------------------------------------------------------------


def test_reload_swaps_and_keeps_the_old_policy_on_error(tmp_path: Path) -> None:
    model = tmp_path / "model.conf"
    model.write_text(MODEL_TEXT)
    policy = tmp_path / "policy.csv"
    policy.write_text("p, id:a, hpc, endpoint, start_endpoint, -, allow\n")
    holder = AuthorizerHolder(Authorizer.from_files(model, policy, clock=FakeClock()))
    assert holder.decide(req("id:a")).allowed
    first = holder.current

    policy.write_text("p, id:b, hpc, endpoint, start_endpoint, -, allow\n")
    holder.reload(model, policy)
    assert holder.current is not first
    assert holder.decide(req("id:b")).allowed
    assert not holder.decide(req("id:a")).allowed
    second = holder.current

    policy.write_text("p, id:c, hpc, endpoint, start_endpoint, sudo, allow\n")
    with pytest.raises(AuthzConfigError, match=r"policy\.csv:1"):
        holder.reload(model, policy)
    assert holder.current is second
    assert holder.decide(req("id:b")).allowed
    assert not holder.decide(req("id:c")).allowed


# --- principals of a caller -------------------------------------------------------------------


def account(name: str = "alice", groups: tuple[str, ...] = ()) -> Account:
    return Account(name, 1000, 1000, f"/home/{name}", "/bin/sh", group_names=groups)


def test_principals_of_lists_identities_then_the_account_and_its_groups() -> None:
    identities = IdentitySet(
        (
            Identity("u-1", {"id": "u-1", "username": "alice@example.org"}),
            Identity("u-2", {"id": "u-2", "username": "ab12"}),
        )
    )
    assert principals_of(identities, account(groups=("alice", "physics"))) == (
        "id:u-1",
        "username:alice@example.org",
        "domain:example.org",
        "id:u-2",
        "username:ab12",
        "user:alice",
        "group:alice",
        "group:physics",
    )


def test_principals_of_an_unmapped_caller_has_only_identities() -> None:
    identities = IdentitySet((Identity("u-1", {"id": "u-1", "username": 7}),))
    assert principals_of(identities, None) == ("id:u-1",)


def test_principals_of_drops_repeats_keeping_the_first() -> None:
    identities = IdentitySet(
        (
            Identity("u-1", {"id": "u-1", "username": "a@example.org"}),
            Identity("u-1", {"id": "u-1", "username": "b@example.org"}),
        )
    )
    principals = principals_of(identities, account(groups=("staff", "staff")))
    assert principals == (
        "id:u-1",
        "username:a@example.org",
        "domain:example.org",
        "username:b@example.org",
        "user:alice",
        "group:staff",
    )
    policy = "p, domain:example.org, hpc, endpoint, start_endpoint, -, allow\n"
    assert authorizer(policy).decide(req(*principals)).allowed
