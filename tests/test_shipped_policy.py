"""The shipped policy and the examples, proven against what the daemon really asks.

Three things are checked here:

1. **The daemon asks exactly ``REQUEST_KINDS``.** The real pipeline, on the example
   deployment's real site (mapping, template, ``base.csv`` + ``policy.csv``; accounts
   from an in-memory database), serves submit, task reads, status, introspect, stop and
   stop-another over HTTP; every question it put to the policy is recorded. Each is one
   of ``mepd.admission.REQUEST_KINDS``, every kind was asked, and ``read_result`` never.
2. **docs/authorization.md lists the same kinds**, with the answers ``base.csv`` gives.
3. **The shipped files decide each kind as documented**: ``base.csv`` alone, each example
   of ``policies/examples/`` as documented (after ``base.csv``, or instead of it), and the
   policy lists of ``examples/daemon/mepd.yaml`` and ``examples/demo/settings.yaml.in``
   as those settings name them. The table below is the documented answer.
"""

from __future__ import annotations

import asyncio
import datetime
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import yaml

from mepcore.authz import Authorizer, AuthzRequest, principals_of
from mepcore.config import SiteFiles
from mepcore.identity import AccountPolicy, IdentityMapper
from mepcore.testing import FakeAccountDatabase, FakeClock
from mepcore.types import Account, Identity, IdentitySet
from mepd.admission import (
    MAP_IDENTITY,
    READ_STATUS,
    REQUEST_KINDS,
    START_ENDPOINT,
    STOP_OTHER,
    STOP_OWN,
    SUBMIT_TASK,
    DecisionView,
    RequestKind,
)
from mepd.api import create_app
from mepd.audit import AuditLog
from mepd.auth import Authenticator, Caller, issue_local_token, load_or_create_local_key
from mepd.pipeline import Pipeline
from mepd.settings import IssuerSettings, Limits, Settings
from mepd.sites import LoadedSite
from mepd.store import TaskStore
from tests.daemon_harness import FakeEndpoints, b64

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"
DAEMON_EXAMPLE = REPO / "examples" / "daemon"
DEMO_EXAMPLE = REPO / "examples" / "demo"
DOCS = REPO / "docs" / "authorization.md"

APPROVED = "7f15325032eb6715e66e9bce26a90287ea2bbf8f8acc8840fa76fccd14f7d2df"
REVOKED = "c518bf46b0c2749a51d7d46c8d013ab93b2a2b60ba6c3687498234a2d145c313"
UNLISTED = "8f0dd7fb7c3452dc5a63e58a725240a423e8c96f4bfa131dc9b8264da4702e68"


def kind_pattern(kind: RequestKind) -> re.Pattern[str]:
    """The objects a kind stands for: each ``{placeholder}`` is one non-empty value."""
    parts = re.split(r"\{[a-z_]+\}", kind.obj)
    return re.compile("[^:]+".join(re.escape(p) for p in parts))


def kind_of(obj: str, action: str) -> RequestKind | None:
    for kind in REQUEST_KINDS:
        if kind.action == action and kind_pattern(kind).fullmatch(obj):
            return kind
    return None


# -- 1. what the daemon asks ------------------------------------------------------------


@attrs.define(eq=False)
class RecordingSite(LoadedSite):
    """The daemon's real site, remembering every question put to its policy."""

    asked: list[tuple[str, str]] = attrs.field(factory=list)

    def decide(
        self, obj: str, action: str, principals: Sequence[str], caller: Caller, account: Account
    ) -> DecisionView:
        self.asked.append((obj, action))
        return super().decide(obj, action, principals, caller, account)


def example_site() -> RecordingSite:
    """examples/daemon's endpoint "hpc" with its files as mepd.yaml names them."""
    settings = Settings.from_file(DAEMON_EXAMPLE / "mepd.yaml")
    (ep,) = settings.endpoints
    accounts = FakeAccountDatabase()
    for name, uid in (("alice", 2001), ("bob", 2002), ("operator", 2003)):
        accounts.add(name, uid)
    return RecordingSite(
        ep,
        IdentityMapper.from_file(ep.mapping),
        Authorizer.from_files(ep.policy_model, ep.policy),
        SiteFiles.from_files(ep.template, ep.schema, ep.environment),
        accounts,
        AccountPolicy(min_uid=1000),
    )


def test_the_daemon_asks_exactly_the_request_kinds_and_the_example_allows_them(
    tmp_path: Path,
) -> None:
    site = example_site()
    issuer = IssuerSettings(type="local")
    authenticator = Authenticator((issuer,), tmp_path)
    authenticator.load()
    audit = AuditLog(tmp_path / "audit.jsonl")
    audit.open()
    endpoints = FakeEndpoints()
    pipeline = Pipeline.create(
        store=TaskStore.open(tmp_path / "tasks.sqlite3"),
        audit=audit,
        authenticator=authenticator,
        ueps=endpoints,
        limits=Limits(),
        site_of={site.name: site}.get,
    )
    endpoints.pipeline = pipeline
    key = load_or_create_local_key(tmp_path)

    def headers(username: str, mfa: bool = False) -> dict[str, str]:
        token = issue_local_token(key, issuer, username, mfa=mfa)
        return {"Authorization": f"Bearer {token}"}

    alice, operator = headers("alice@example.org"), headers("operator@example.org", mfa=True)

    async def scenario(client: httpx.AsyncClient) -> None:
        r = await client.post("/v1/functions", json={"function": b64(b"fn")}, headers=alice)
        fid = r.json()["function_id"]
        body = {"tasks": [{"function_id": fid, "args": b64(b"x")}]}
        r = await client.post("/v1/endpoints/hpc/submit", json=body, headers=alice)
        assert r.status_code == 200, r.text
        (task_id,) = r.json()["task_ids"]
        r = await client.post("/v1/tasks/wait", json={"task_ids": [task_id]}, headers=alice)
        assert r.status_code == 200, r.text
        assert (await client.get(f"/v1/tasks/{task_id}", headers=alice)).status_code == 200
        for route in ("status", "introspect"):
            r = await client.get(f"/v1/endpoints/hpc/{route}", headers=alice)
            assert r.status_code == 200, (route, r.text)
        r = await client.post("/v1/endpoints/hpc/stop", headers=alice)
        assert r.status_code == 200, r.text
        r = await client.post("/v1/endpoints/hpc/stop", json={"account": "bob"}, headers=alice)
        assert r.status_code == 403, r.text
        r = await client.post("/v1/endpoints/hpc/stop", json={"account": "bob"}, headers=operator)
        assert r.status_code == 200, r.text

    async def main() -> None:
        transport = httpx.ASGITransport(app=create_app(pipeline, pipeline.limits))
        async with httpx.AsyncClient(transport=transport, base_url="http://mepd") as client:
            await scenario(client)

    asyncio.run(main())
    unknown = [q for q in site.asked if kind_of(*q) is None]
    assert not unknown, f"the daemon asked what REQUEST_KINDS does not list: {unknown}"
    assert {kind_of(*q) for q in site.asked} == set(REQUEST_KINDS)
    assert not [q for q in site.asked if q[1] == "read_result"]
    # The template object is the endpoint's template_name, not the template file's name.
    assert ("template:default", "start_endpoint") in site.asked


def test_read_result_is_asked_by_no_kind_and_granted_by_no_shipped_file() -> None:
    assert all(kind.action != "read_result" for kind in REQUEST_KINDS)
    shipped = [*POLICIES.rglob("*.csv"), *(REPO / "examples").rglob("*.csv")]
    assert shipped
    for path in shipped:
        assert "read_result" not in path.read_text(), path


# -- 2. the documented list ----------------------------------------------------------------

# A short name for each kind, used by the table below.
KINDS: dict[str, RequestKind] = {
    "map": MAP_IDENTITY,
    "start": START_ENDPOINT,
    "submit": SUBMIT_TASK,
    "status": READ_STATUS,
    "stop": STOP_OWN,
    "stop_other": STOP_OTHER,
}


def test_every_kind_has_a_name_in_the_table() -> None:
    assert set(KINDS.values()) == set(REQUEST_KINDS)
    assert len(REQUEST_KINDS) == len(set(REQUEST_KINDS))


def documented_kinds() -> dict[tuple[str, str], str]:
    """(object, action) -> the base.csv answer, from the table in docs/authorization.md."""
    text = DOCS.read_text()
    section = text[text.index("## What mepd asks") :]
    section = section[: section.index("\n#", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`") and cells[2].startswith("`"):
            rows[(cells[1].strip("`"), cells[2].strip("`"))] = cells[3]
    return rows


def test_docs_list_every_kind_and_nothing_else() -> None:
    documented = documented_kinds()
    in_code = {(re.sub(r"\{([a-z_]+)\}", r"<\1>", k.obj), k.action) for k in REQUEST_KINDS}
    assert set(documented) == in_code


# -- 3. the documented answers -----------------------------------------------------------

NOON = datetime.datetime(2024, 5, 1, 12, tzinfo=datetime.UTC).timestamp()
NIGHT = datetime.datetime(2024, 5, 1, 3, tzinfo=datetime.UTC).timestamp()


@attrs.frozen
class Who:
    """A caller after mapping: an identity username, its account and how it logged in."""

    username: str
    account: str
    uid: int
    groups: tuple[str, ...] = ()
    mfa: bool = False
    auth_age: float = 60.0

    def principals(self) -> tuple[str, ...]:
        accounts = FakeAccountDatabase()
        account = accounts.add(
            self.account, self.uid, groups=[(g, 5000 + i) for i, g in enumerate(self.groups)]
        )
        identity = Identity.from_mapping({"id": f"id-{self.account}", "username": self.username})
        return principals_of(IdentitySet((identity,)), account)


ALICE = Who("alice@campus.edu", "alice", 1001, ("gpu-users",), mfa=True)
BOB = Who("bob@campus.edu", "bob", 1002)
OLGA = Who("olga@campus.edu", "olga", 1003, ("hpc-ops",))
DORA = Who("dora@campus.edu", "dora", 1004, ("developers",))
EVE = Who("eve@evil.org", "eve", 1005)
SYSTEM = Who("svc@campus.edu", "daemon", 2)
ROOT = Who("root@campus.edu", "root", 0)
EX_ALICE = Who("alice@example.org", "alice", 1001)
EX_OPERATOR = Who("operator@example.org", "operator", 1010, mfa=True)
EX_OPERATOR_NO_MFA = Who("operator@example.org", "operator", 1010)


def settings_policy(path: Path, text: str | None = None) -> list[Path]:
    """The first endpoint's policy list, as a settings file names it."""
    data = yaml.safe_load(text if text is not None else path.read_text())
    policy = data["endpoints"][0]["policy"]
    return [path.parent / p for p in ([policy] if isinstance(policy, str) else policy)]


def demo_policy() -> list[Path]:
    text = (DEMO_EXAMPLE / "settings.yaml.in").read_text()
    text = text.replace("@REPO@", str(REPO)).replace("@DEMO_DIR@", str(DEMO_EXAMPLE))
    text = text.replace("@ALLOWED_FUNCTIONS@", "[]")
    paths = settings_policy(DEMO_EXAMPLE / "settings.yaml.in", text)
    # Both demo endpoints use the same list.
    assert text.count("policy: [") == 2
    return paths


def base_then(example: str) -> list[Path]:
    return [POLICIES / "base.csv", POLICIES / "examples" / example]


POLICY_SETS: dict[str, list[Path]] = {
    "base": [POLICIES / "base.csv"],
    "campus-only (instead of base)": [POLICIES / "examples" / "campus-only.csv"],
    "base + endpoint-admins": base_then("endpoint-admins.csv"),
    "base + function-allowlist": base_then("function-allowlist.csv"),
    "base + gpu-template": base_then("gpu-template.csv"),
    "base + maintenance-window": base_then("maintenance-window.csv"),
    "examples/daemon": settings_policy(DAEMON_EXAMPLE / "mepd.yaml"),
    "examples/demo": demo_policy(),
}

EVERY_KIND = tuple(KINDS)


@attrs.frozen
class Row:
    """The documented answer of one policy set to one kind of request by one caller."""

    policies: str
    who: Who
    kinds: tuple[str, ...]
    expect: str
    endpoint: str = "hpc"
    template_name: str = "default"
    function_id: str = APPROVED
    at: float = NOON


def rows(policies: str, who: Who, expect: str, kinds: Iterable[str], **kw: Any) -> Row:
    return Row(policies, who, tuple(kinds), expect, **kw)


TABLE: list[Row] = [
    # base.csv: the docs' column. A regular account: mapped, the unnamed template, its
    # own status and stop; no function, no stopping others, no named template.
    rows("base", ALICE, "allow", ["map", "start", "status", "stop"]),
    rows("base", ALICE, "deny", ["submit", "stop_other"]),
    rows("base", ALICE, "deny", ["start"], template_name="gpu"),
    rows("base", SYSTEM, "deny", EVERY_KIND),
    rows("base", ROOT, "deny", EVERY_KIND),
    # campus-only.csv, a complete policy: everything for campus.edu but stopping others.
    rows("campus-only (instead of base)", ALICE, "allow", ["map", "start", "submit"]),
    rows("campus-only (instead of base)", ALICE, "allow", ["status", "stop"]),
    rows("campus-only (instead of base)", ALICE, "allow", ["start"], template_name="gpu"),
    rows("campus-only (instead of base)", ALICE, "deny", ["stop_other"]),
    rows("campus-only (instead of base)", EVE, "deny", EVERY_KIND),
    rows("campus-only (instead of base)", ROOT, "deny", EVERY_KIND),
    # endpoint-admins.csv: alice administers hpc, bob gpu, hpc-ops operate hpc.
    rows("base + endpoint-admins", ALICE, "allow", EVERY_KIND),
    rows("base + endpoint-admins", ALICE, "allow", ["start"], template_name="gpu"),
    rows("base + endpoint-admins", ALICE, "deny", ["submit", "stop_other"], endpoint="gpu"),
    rows("base + endpoint-admins", BOB, "allow", ["submit", "stop_other"], endpoint="gpu"),
    rows("base + endpoint-admins", BOB, "deny", ["submit", "stop_other"]),
    rows("base + endpoint-admins", OLGA, "allow", ["stop_other", "status", "stop"]),
    rows("base + endpoint-admins", OLGA, "deny", ["submit"]),
    rows("base + endpoint-admins", OLGA, "deny", ["stop_other"], endpoint="gpu"),
    rows("base + endpoint-admins", ROOT, "deny", EVERY_KIND),
    # function-allowlist.csv: approved sets anywhere, developers anything on dev.
    rows("base + function-allowlist", BOB, "allow", ["map", "start", "submit", "status"]),
    rows("base + function-allowlist", BOB, "deny", ["submit"], function_id=UNLISTED),
    rows("base + function-allowlist", BOB, "deny", ["submit"], function_id=REVOKED),
    rows(
        "base + function-allowlist", DORA, "allow", ["submit"], endpoint="dev", function_id=UNLISTED
    ),
    rows(
        "base + function-allowlist", DORA, "deny", ["submit"], endpoint="dev", function_id=REVOKED
    ),
    rows("base + function-allowlist", DORA, "deny", ["submit"], function_id=UNLISTED),
    rows("base + function-allowlist", ROOT, "deny", ["submit"]),
    # gpu-template.csv: templates named gpu for gpu-users with fresh MFA; cpu for all.
    rows("base + gpu-template", ALICE, "allow", ["start"], template_name="gpu"),
    rows("base + gpu-template", ALICE, "allow", ["start"], template_name="gpu", endpoint="a100"),
    rows(
        "base + gpu-template",
        attrs.evolve(ALICE, mfa=False),
        "deny",
        ["start"],
        template_name="gpu",
    ),
    rows(
        "base + gpu-template",
        attrs.evolve(ALICE, auth_age=7200),
        "deny",
        ["start"],
        template_name="gpu",
    ),
    rows("base + gpu-template", BOB, "deny", ["start"], template_name="gpu"),
    rows("base + gpu-template", BOB, "allow", ["start"], template_name="cpu"),
    rows("base + gpu-template", BOB, "allow", ["map", "start", "status", "stop"]),
    # maintenance-window.csv: campus users run functions on hpc, except 02:00-04:00.
    rows("base + maintenance-window", ALICE, "allow", ["map", "start", "submit", "status", "stop"]),
    rows("base + maintenance-window", ALICE, "deny", ["start", "submit"], at=NIGHT),
    rows("base + maintenance-window", ALICE, "allow", ["map", "status", "stop"], at=NIGHT),
    rows("base + maintenance-window", ALICE, "allow", ["start"], endpoint="gpu", at=NIGHT),
    rows("base + maintenance-window", EVE, "deny", ["submit"]),
    # examples/daemon: base.csv, then example.org may run any function on hpc, and the
    # operator may stop anyone's user endpoints with MFA.
    rows("examples/daemon", EX_ALICE, "allow", ["map", "start", "submit", "status", "stop"]),
    rows("examples/daemon", EX_ALICE, "deny", ["stop_other"]),
    rows("examples/daemon", EX_OPERATOR, "allow", ["stop_other"]),
    rows("examples/daemon", EX_OPERATOR_NO_MFA, "deny", ["stop_other"]),
    rows("examples/daemon", EVE, "deny", ["submit", "stop_other"]),
    rows("examples/daemon", attrs.evolve(EX_ALICE, account="root", uid=0), "deny", EVERY_KIND),
    # examples/demo: base.csv, then example.org may run any function on both endpoints.
    *(
        rows(
            "examples/demo",
            EX_ALICE,
            "allow",
            ["map", "start", "submit", "status", "stop"],
            endpoint=ep,
        )
        for ep in ("demo", "curated")
    ),
    rows("examples/demo", EX_ALICE, "deny", ["stop_other"], endpoint="demo"),
    rows("examples/demo", EVE, "deny", ["submit"], endpoint="demo"),
]


def request_of(row: Row, kind: RequestKind) -> AuthzRequest:
    """The request the daemon would build (as ``LoadedSite.decide`` does)."""
    obj, action = kind.check(
        account=row.who.account, template_name=row.template_name, function_id=row.function_id
    )
    return AuthzRequest(
        row.endpoint,
        obj,
        action,
        row.who.principals(),
        row.who.mfa,
        row.who.auth_age,
        row.who.uid,
    )


def test_every_policy_set_answers_every_kind_somewhere() -> None:
    for name in POLICY_SETS:
        asked = {k for row in TABLE if row.policies == name for k in row.kinds}
        assert asked == set(KINDS) or name.startswith("base + "), (name, set(KINDS) - asked)
    assert {row.policies for row in TABLE} == set(POLICY_SETS)


@pytest.mark.parametrize("name", sorted(POLICY_SETS))
def test_the_shipped_policies_decide_as_documented(name: str) -> None:
    paths = POLICY_SETS[name]
    for path in paths:
        assert path.is_file(), path
    model = POLICIES / "model.conf"
    authorizers = {
        at: Authorizer.from_files(model, paths, clock=FakeClock(wall=at)) for at in (NOON, NIGHT)
    }
    wrong = []
    for row in (r for r in TABLE if r.policies == name):
        for short in row.kinds:
            request = request_of(row, KINDS[short])
            decision = authorizers[row.at].decide(request)
            got = "allow" if decision.allowed else "deny"
            if got != row.expect:
                wrong.append(
                    f"{row.who.username} ({row.who.account}) {short} {request.obj} on "
                    f"{request.endpoint}: expected {row.expect}, got {got} ({decision.reason})"
                )
    assert not wrong, "\n".join(wrong)


def test_base_csv_answers_a_regular_account_as_the_docs_say() -> None:
    """The docs' last column is base.csv's answer for a regular account."""
    documented = documented_kinds()
    authorizer = Authorizer.from_files(POLICIES / "model.conf", [POLICIES / "base.csv"])
    for short, kind in KINDS.items():
        row = Row("base", BOB, (short,), "")
        allowed = authorizer.decide(request_of(row, kind)).allowed
        shown = (re.sub(r"\{([a-z_]+)\}", r"<\1>", kind.obj), kind.action)
        words = documented[shown].split()
        assert words[0] == ("allow" if allowed else "deny"), (short, documented[shown])
