"""``SpawnGate`` (``mepcore.contrib.profiles``): the policy behind JupyterHub's spawns, pure.

It asks what mepd asks before it starts a user endpoint (``map_identity`` on
``user:<account>``, then ``start_endpoint`` on ``template:<profile>``), answers with the
policy's reason and lines, and filters the profiles a service offers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mepcore.authz import MODEL_TEXT, Authorizer
from mepcore.contrib.login import login_identities
from mepcore.contrib.profiles import SpawnGate
from mepcore.errors import AuthzConfigError, AuthzError
from mepcore.testing import FakeAccountDatabase

ROOT = Path(__file__).resolve().parent.parent
POLICY = """\
# the hub's policy
p, **, jupyterhub, user:*, map_identity, uid_ge:1000, allow
p, **, jupyterhub, template:default, start_endpoint, uid_ge:1000, allow
p, group:gpu-users, jupyterhub, template:gpu, start_endpoint, -, allow
p, group:suspended, jupyterhub, **, *, -, deny
p, domain:partner.example, jupyterhub, template:partner, start_endpoint, -, allow
"""


@pytest.fixture
def accounts() -> FakeAccountDatabase:
    db = FakeAccountDatabase()
    db.add("alice", 1001, groups=[("gpu-users", 2001)])
    db.add("bob", 1002)
    db.add("carol", 1003, groups=[("suspended", 2002)])
    db.add("svc", 500)
    return db


@pytest.fixture
def gate() -> SpawnGate:
    return SpawnGate(Authorizer.from_text(MODEL_TEXT, POLICY, source="hub.csv"))


def test_an_allowed_profile(gate: SpawnGate, accounts: FakeAccountDatabase) -> None:
    decision = gate.decide(accounts.accounts["alice"], "gpu")
    assert decision.allowed and decision.reason == "authz.allowed"
    assert (decision.obj, decision.action) == ("template:gpu", "start_endpoint")
    assert "hub.csv:4" in decision.detail


def test_a_profile_no_line_allows_is_denied(gate: SpawnGate, accounts: FakeAccountDatabase) -> None:
    decision = gate.decide(accounts.accounts["bob"], "gpu")
    assert (decision.allowed, decision.reason) == (False, "authz.denied")
    assert decision.public_message == "the policy does not allow this request (authz.denied)"
    assert "no policy line matched" in decision.detail


def test_a_deny_line_refuses_at_the_first_question(
    gate: SpawnGate, accounts: FakeAccountDatabase
) -> None:
    decision = gate.decide(accounts.accounts["carol"], "default")
    assert (decision.allowed, decision.reason) == (False, "authz.explicit_deny")
    assert (decision.obj, decision.action) == ("user:carol", "map_identity")
    assert "hub.csv:5: p, group:suspended" in decision.detail
    error = decision.to_error()
    assert isinstance(error, AuthzError) and error.reason == "authz.explicit_deny"
    assert error.context["profile"] == "default"


def test_a_condition_that_fails_is_the_reason(
    gate: SpawnGate, accounts: FakeAccountDatabase
) -> None:
    decision = gate.decide(accounts.accounts["svc"], "default")
    assert (decision.allowed, decision.reason) == (False, "authz.condition_failed")


def test_allowed_profiles_keep_the_order_given(
    gate: SpawnGate, accounts: FakeAccountDatabase
) -> None:
    profiles = ["gpu", "partner", "default"]
    assert gate.allowed_profiles(accounts.accounts["alice"], profiles) == ("gpu", "default")
    assert gate.allowed_profiles(accounts.accounts["bob"], profiles) == ("default",)
    assert gate.allowed_profiles(accounts.accounts["carol"], profiles) == ()


def test_the_login_identities_add_their_principals(
    gate: SpawnGate, accounts: FakeAccountDatabase
) -> None:
    bob = accounts.accounts["bob"]
    assert gate.principals(bob, None) == ("user:bob", "group:bob")
    assert not gate.decide(bob, "partner").allowed
    identities = login_identities("bob@partner.example")
    assert "domain:partner.example" in gate.principals(bob, identities)
    assert gate.decide(bob, "partner", identities=identities).allowed


def test_the_endpoint_is_the_policys_domain(accounts: FakeAccountDatabase) -> None:
    other = SpawnGate(Authorizer.from_text(MODEL_TEXT, POLICY), endpoint="otherhub")
    assert not other.decide(accounts.accounts["alice"], "default").allowed


def test_a_profile_the_policy_cannot_express_is_refused(
    gate: SpawnGate, accounts: FakeAccountDatabase
) -> None:
    with pytest.raises(AuthzError) as caught:
        gate.decide(accounts.accounts["alice"], "bad\nname")
    assert caught.value.reason == "authz.request_invalid"


def test_from_files_with_the_shipped_model_or_a_model_file(
    tmp_path: Path, accounts: FakeAccountDatabase
) -> None:
    policy = tmp_path / "hub.csv"
    policy.write_text(POLICY)
    alice = accounts.accounts["alice"]
    assert SpawnGate.from_files(policy).decide(alice, "gpu").allowed
    with_model = SpawnGate.from_files([policy], model=ROOT / "policies" / "model.conf")
    assert with_model.decide(alice, "gpu").allowed


@pytest.mark.parametrize(
    ("text", "what"),
    [
        (b"p, **, jupyterhub, template:x*, start_endpoint, -, allow\n", "hub.csv:1"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_from_files_refuses_a_broken_policy(tmp_path: Path, text: bytes, what: str) -> None:
    policy = tmp_path / "hub.csv"
    policy.write_bytes(text)
    with pytest.raises(AuthzConfigError) as caught:
        SpawnGate.from_files(policy)
    assert what in caught.value.detail
    with pytest.raises(AuthzConfigError, match="cannot read"):
        SpawnGate.from_files(tmp_path / "absent.csv")
