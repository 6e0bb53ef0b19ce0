"""Property tests: whatever the identities and the mapping output, no unsafe account;
and whatever order the linked identities come in, the same answer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from mepcore.errors import IdentityError
from mepcore.identity import AccountPolicy, CommandOutput, IdentityMapper, check_account
from mepcore.testing import FakeAccountDatabase
from mepcore.types import Identity, IdentitySet

EXPR = "expression_identity_mapping#1.0.0"

# Rules that pass identity text through in several ways, so arbitrary identity
# strings become arbitrary mapped names.
PASS_THROUGH = IdentityMapper.from_documents(
    [
        {
            "DATA_TYPE": EXPR,
            "mep_match_syntax": "python",
            "mappings": [
                {"source": "{username}", "match": r"(.*)@example\.org", "output": "{0}"},
                {"source": "{email}", "match": "([^@]*)@(.*)", "output": "{1}{0}"},
                {"source": "{username}", "match": "(.*)", "output": "{0}", "ignore_case": True},
                {"source": "{name}", "match": "(?s)(.*)", "output": "{0}"},
            ],
        }
    ]
)

NAME_POOL = ["root", "0", "-1", "4294967295", "daemon", "alice", "bob", "svc", "Alice", "аlice"]
names = st.one_of(st.sampled_from(NAME_POOL), st.sampled_from(NAME_POOL), st.text(max_size=40))
uids = st.one_of(st.sampled_from([0, 1, 999, 1000, 1001, 65534]), st.integers(0, 2**32 - 1))


@st.composite
def databases(draw: st.DrawFn) -> FakeAccountDatabase:
    """Every pooled name exists with some uid (so mapped names are often found), plus
    arbitrary others; sometimes the database answers under another name."""
    db = FakeAccountDatabase()
    pooled = {name: draw(uids) for name in NAME_POOL}
    extra = draw(st.dictionaries(names, uids, max_size=6))
    for name, uid in {**pooled, **extra}.items():
        alias = draw(st.one_of(st.none(), st.none(), st.none(), names))
        db.add(name, uid, pw_name=alias)
    return db


identity_fields = st.fixed_dictionaries(
    {},
    optional={
        "username": st.one_of(names, names.map(lambda n: n + "@example.org")),
        "email": st.one_of(names, st.builds("{}@{}".format, names, names)),
        "name": names,
    },
)
identity_sets = st.lists(identity_fields, min_size=1, max_size=4).map(
    lambda items: IdentitySet.from_json([{"id": f"id-{i}", **f} for i, f in enumerate(items)])
)
policies = st.builds(
    AccountPolicy,
    min_uid=st.one_of(st.sampled_from([0, 1, 1000]), st.integers(0, 70000)),
    daemon_uid=st.one_of(st.none(), uids),
    deny=st.frozensets(names, max_size=3),
)


def assert_safe(name: str | None, db: FakeAccountDatabase, policy: AccountPolicy) -> None:
    if name is None:
        return
    try:
        account = check_account(name, db, policy)
    except IdentityError:
        return  # refused: safe whatever the reason
    assert account.uid != 0
    assert account.uid >= policy.min_uid
    assert account.uid != policy.daemon_uid
    assert account.name == name
    assert name not in policy.deny
    assert name.isascii() and not name.isdigit() and len(name) <= 32


@settings(max_examples=400, deadline=None)
@given(identities=identity_sets, db=databases(), policy=policies)
def test_expression_mapping_never_yields_an_unsafe_account(
    identities: IdentitySet, db: FakeAccountDatabase, policy: AccountPolicy
) -> None:
    try:
        result = PASS_THROUGH.map(identities)
    except IdentityError as exc:
        # Refused as ambiguous: no name at all; its candidates are still names.
        refused = exc
    else:
        assert_safe(result.username, db, policy)
        for candidate in result.candidates:
            assert_safe(candidate.username, db, policy)
        return
    assert refused.reason == "identity.ambiguous_mapping"
    for item in refused.context["candidates"]:
        assert_safe(item["username"], db, policy)


class ScriptedRunner:
    """Answers with whatever names the test drew, for the identities it was given."""

    def __init__(self, outputs: Sequence[str]) -> None:
        self.outputs = outputs

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        request = json.loads(stdin)
        result = [
            {"id": identity["id"], "output": output}
            for identity, output in zip(request["identities"], self.outputs, strict=False)
        ]
        answer = {"DATA_TYPE": "identity_mapping_output#1.0.0", "result": result}
        return CommandOutput(0, json.dumps(answer).encode())


@settings(max_examples=300, deadline=None)
@given(
    identities=identity_sets,
    outputs=st.lists(names, max_size=4),
    db=databases(),
    policy=policies,
)
def test_external_mapping_never_yields_an_unsafe_account(
    identities: IdentitySet,
    outputs: list[str],
    db: FakeAccountDatabase,
    policy: AccountPolicy,
) -> None:
    mapper = IdentityMapper.from_documents(
        [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/opt/mapper"]}],
        runner=ScriptedRunner(outputs),
    )
    try:
        username = mapper.map(identities).username
    except IdentityError as exc:
        reason: str | None = exc.reason
    else:
        assert_safe(username, db, policy)
        return
    assert reason == "identity.ambiguous_mapping"


@settings(max_examples=300, deadline=None)
@given(username=st.text(max_size=60))
def test_domain_rule_only_strips_a_whole_suffix(username: str) -> None:
    # Every field the rules name is present: a missing one fails the whole document.
    identity = {"id": "x", "username": username, "email": "e@x", "name": "n"}
    result = PASS_THROUGH.map(IdentitySet.from_json(identity))
    if result.rule == 0:
        assert result.username is not None
        # Whole-string match: nothing may follow the domain, not even a newline.
        assert result.username + "@example.org" == username
        assert "\n" not in result.username
    else:
        local = username.removesuffix("@example.org")
        whole_match = local != username and "\n" not in local
        # Not chosen: either no whole-string match, or an empty local part (no name).
        assert not whole_match or local == ""


@settings(max_examples=200, deadline=None)
@given(alternative=st.text(max_size=20))
def test_alternation_matches_only_its_alternatives(alternative: str) -> None:
    mapper = IdentityMapper.from_documents(
        [
            {
                "DATA_TYPE": EXPR,
                "mappings": [{"source": "{username}", "match": "alice|bob", "output": "ok"}],
            }
        ]
    )
    result = mapper.map(IdentitySet.from_json({"id": "x", "username": alternative}))
    assert (result.username == "ok") == (alternative in {"alice", "bob"})


# -- the order of the linked identities chooses nothing --------------------------------

STATUSES = st.one_of(
    st.just({}),
    st.sampled_from(["used", "private", "unused", "closed", "Used", ""]).map(
        lambda s: {"status": s}
    ),
    st.sampled_from([None, 1, ["used"]]).map(lambda s: {"status": s}),
)
# Few ids and few names, so linked identities often share an id, collide on a name or
# disagree on one: the cases where an order could matter.
linked_identities = st.lists(
    st.builds(
        lambda ident, fields, status: {"id": ident, **fields, **status},
        st.sampled_from(["id-a", "id-b", "id-c", "id-d", "p"]),
        identity_fields,
        STATUSES,
    ),
    max_size=5,
)
primaries = st.builds(
    lambda fields, status: {"id": "p", **fields, **status}, identity_fields, STATUSES
)

# Mappers whose rules make linked identities agree (a constant output), disagree
# (pass-through) or match only some of them.
EXPRESSION_MAPPERS = [
    PASS_THROUGH,
    IdentityMapper.from_documents(
        [
            {
                "DATA_TYPE": EXPR,
                "mep_match_syntax": "python",
                "mappings": [
                    {"source": "{username}", "match": r".*@example\.org", "output": "shared"},
                    {"source": "{email}", "match": "([^@]*)@(.*)", "output": "{0}"},
                ],
            },
            {
                "DATA_TYPE": EXPR,
                "mep_match_syntax": "python",
                "mappings": [{"source": "{name}", "match": "(?s).+", "output": "named"}],
            },
        ]
    ),
]


def outcome(mapper: IdentityMapper, items: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a caller and an administrator could observe of one mapping."""
    try:
        result = mapper.map(IdentitySet.from_json(items))
    except IdentityError as exc:
        return ("refused", exc.admin_reason, exc.detail, exc.context.get("candidates"))
    return ("mapped", result.to_dict())


@settings(max_examples=500, deadline=None)
@given(
    primary=primaries,
    linked=linked_identities,
    data=st.data(),
    mapper_index=st.sampled_from(range(len(EXPRESSION_MAPPERS))),
)
def test_expression_mapping_does_not_depend_on_the_order_of_linked_identities(
    primary: dict[str, Any], linked: list[dict[str, Any]], data: st.DataObject, mapper_index: int
) -> None:
    mapper = EXPRESSION_MAPPERS[mapper_index]
    shuffled = data.draw(st.permutations(linked))
    assert outcome(mapper, [primary, *linked]) == outcome(mapper, [primary, *shuffled])


class ContentRunner:
    """A mapping program whose answer depends on what it is given, including the order:
    each identity maps by its ``username`` (or not at all), and with ``first_only`` only
    the first identity it is given is answered."""

    def __init__(self, first_only: bool) -> None:
        self.first_only = first_only
        self.inputs: list[bytes] = []

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        self.inputs.append(stdin)
        given = json.loads(stdin)["identities"]
        result = [
            {"id": i["id"], "output": i["username"]}
            for i in (given[:1] if self.first_only else given)
            if isinstance(i.get("username"), str)
        ]
        answer = {"DATA_TYPE": "identity_mapping_output#1.0.0", "result": result}
        return CommandOutput(0, json.dumps(answer).encode())


@settings(max_examples=300, deadline=None)
@given(primary=primaries, linked=linked_identities, data=st.data(), first_only=st.booleans())
def test_external_mapping_does_not_depend_on_the_order_of_linked_identities(
    primary: dict[str, Any], linked: list[dict[str, Any]], data: st.DataObject, first_only: bool
) -> None:
    shuffled = data.draw(st.permutations(linked))
    runner = ContentRunner(first_only)
    mapper = IdentityMapper.from_documents(
        [{"DATA_TYPE": "external_identity_mapping#1.0.0", "command": ["/opt/mapper"]}],
        runner=runner,
    )
    assert outcome(mapper, [primary, *linked]) == outcome(mapper, [primary, *shuffled])
    # The program itself was given the same input both times.
    assert len(set(runner.inputs)) <= 1


@settings(max_examples=300, deadline=None)
@given(primary=primaries, linked=linked_identities)
def test_unmappable_identities_count_for_nothing(
    primary: dict[str, Any], linked: list[dict[str, Any]]
) -> None:
    # Leaving out every linked identity whose status is not used/private changes nothing.
    kept = [i for i in linked if Identity.from_mapping(i).mappable]
    for mapper in EXPRESSION_MAPPERS:
        assert outcome(mapper, [primary, *linked]) == outcome(mapper, [primary, *kept])
        result = outcome(mapper, [primary, *linked])
        if result[0] == "mapped":
            mappable = {i["id"] for i in [primary, *kept] if Identity.from_mapping(i).mappable}
            assert {c["identity"] for c in result[1]["candidates"]} <= mappable
