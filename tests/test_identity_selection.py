"""Which identities a mapping may use, and a choice no client controls (issue 14).

A linked identity whose ``status`` is not ``used``/``private`` maps to nothing; the
result does not depend on the order of the linked identities in the token: the primary
identity decides when it matches, otherwise linked identities must agree, and when they
produce different names the mapping is refused as ambiguous. Each test here fails on a
mapper that takes "the first identity of the set" as given.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from mepcore.errors import REASONS, IdentityError
from mepcore.identity import CommandOutput, IdentityMapper, MappingResult
from mepcore.types import Identity, IdentitySet

EXPR = "expression_identity_mapping#1.0.0"
EXT = "external_identity_mapping#1.0.0"
OUT = "identity_mapping_output#1.0.0"

# One rule that maps both domains: every identity below matches it.
BOTH_DOMAINS = [
    {
        "DATA_TYPE": EXPR,
        "mappings": [
            {"source": "{username}", "match": r"(.*)@(example\.org|campus\.edu)", "output": "{0}"}
        ],
    }
]
PRIMARY = {"id": "p-0001", "username": "p@elsewhere.net"}  # matches no rule
ALICE = {"id": "id-a", "username": "alice@example.org"}
BOB = {"id": "id-b", "username": "bob@campus.edu"}


def mapper(docs: Any = BOTH_DOMAINS, **kwargs: Any) -> IdentityMapper:
    return IdentityMapper.from_documents(docs, **kwargs)


def identities(*items: dict[str, Any]) -> IdentitySet:
    return IdentitySet.from_json(list(items))


def refusal(m: IdentityMapper, identity_set: IdentitySet) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        m.map(identity_set)
    return info.value


# -- status: closed and unused identities map to nothing ------------------------------


def test_a_closed_linked_identity_is_not_mapped() -> None:
    result = mapper().map(identities(PRIMARY, {**ALICE, "status": "closed"}))
    assert result == MappingResult(None, None, None, None, ())


@pytest.mark.parametrize("status", ["unused", "closed", "Used", "USED", "", None, 1, ["used"]])
def test_any_status_but_used_or_private_is_not_mapped(status: Any) -> None:
    result = mapper().map(identities(PRIMARY, {**ALICE, "status": status}, BOB))
    assert (result.username, result.matched_identity) == ("bob", "id-b")
    assert [c.identity for c in result.candidates] == ["id-b"]


@pytest.mark.parametrize("status", ["used", "private"])
def test_used_and_private_identities_are_mapped(status: str) -> None:
    result = mapper().map(identities(PRIMARY, {**ALICE, "status": status}))
    assert (result.username, result.matched_identity) == ("alice", "id-a")


def test_an_identity_without_a_status_is_mapped_as_before() -> None:
    assert mapper().map(identities(PRIMARY, ALICE)).username == "alice"
    assert Identity("x", {"id": "x"}).mappable


def test_a_closed_primary_identity_is_not_mapped_and_gives_no_precedence() -> None:
    closed_primary = {"id": "p-0001", "username": "carol@example.org", "status": "closed"}
    assert mapper().map(identities(closed_primary, BOB)).username == "bob"
    # Without its precedence, two linked identities that disagree are ambiguous.
    error = refusal(mapper(), identities(closed_primary, ALICE, BOB))
    assert error.reason == "identity.ambiguous_mapping"


def test_the_mapping_order_leaves_out_unmappable_identities() -> None:
    ordered = identities(
        PRIMARY, {"id": "z", "status": "used"}, {"id": "c", "status": "closed"}, {"id": "b"}
    ).mapping_order()
    assert [i.id for i in ordered] == ["p-0001", "b", "z"]


# -- order: the same set in any order gives the same answer ----------------------------


def test_linked_identities_that_disagree_are_refused_in_either_order() -> None:
    one = refusal(mapper(), identities(PRIMARY, ALICE, BOB))
    other = refusal(mapper(), identities(PRIMARY, BOB, ALICE))
    assert one.reason == other.reason == "identity.ambiguous_mapping"
    assert one.detail == other.detail
    # The administrator is told which identities produced which names; the caller not.
    assert "id-a -> 'alice'" in one.detail and "id-b -> 'bob'" in one.detail
    assert one.to_public() == {
        "reason": "identity.ambiguous_mapping",
        "message": REASONS["identity.ambiguous_mapping"],
    }
    assert "alice" not in one.public_message and "bob" not in one.public_message
    assert [c["identity"] for c in one.context["candidates"]] == ["id-a", "id-b"]


def test_the_primary_identity_decides_whatever_the_order_of_the_linked_ones() -> None:
    primary = {"id": "p-0001", "username": "carol@example.org"}
    results = [
        mapper().map(identities(primary, *linked))
        for linked in ([ALICE, BOB], [BOB, ALICE], [BOB], [])
    ]
    assert {(r.username, r.matched_identity) for r in results} == {("carol", "p-0001")}


def test_linked_identities_that_agree_give_the_same_result_in_either_order() -> None:
    same = [
        {
            "DATA_TYPE": EXPR,
            "mappings": [{"source": "{username}", "match": r".*@example\.org", "output": "alice"}],
        }
    ]
    other = {"id": "id-c", "username": "al@example.org"}
    one = mapper(same).map(identities(PRIMARY, other, ALICE))
    two = mapper(same).map(identities(PRIMARY, ALICE, other))
    assert one == two
    assert (one.username, one.matched_identity) == ("alice", "id-a")  # the lowest id
    assert [c.identity for c in one.candidates] == ["id-a", "id-c"]


def test_an_earlier_rule_still_decides_before_a_later_one() -> None:
    # Rule order is the administrator's: a linked identity matching rule 0 wins over
    # the primary identity matching only rule 1, as in Globus Compute.
    docs = [
        {
            "DATA_TYPE": EXPR,
            "mappings": [
                {"source": "{username}", "match": r"(.*)@campus\.edu", "output": "ca_{0}"},
                {"source": "{username}", "match": r"(.*)@example\.org", "output": "ex_{0}"},
            ],
        }
    ]
    primary = {"id": "p-0001", "username": "carol@example.org"}
    result = mapper(docs).map(identities(primary, ALICE, BOB))
    assert (result.username, result.rule) == ("ca_bob", 0)
    assert [(c.identity, c.rule) for c in result.candidates] == [
        ("id-b", 0),
        ("p-0001", 1),
        ("id-a", 1),
    ]


# -- external programs: the same input whatever the token's order ----------------------


class RecordingRunner:
    """A mapping program that maps every identity it is given by its ``username``
    (``first_only``: only the first one, as an order-dependent program might)."""

    def __init__(self, *, first_only: bool = False, extra: Sequence[dict[str, str]] = ()) -> None:
        self.first_only = first_only
        self.extra = list(extra)
        self.inputs: list[list[str]] = []

    def run(
        self, argv: Sequence[str], stdin: bytes, *, timeout: float, max_output: int
    ) -> CommandOutput:
        given = json.loads(stdin)["identities"]
        self.inputs.append([i["id"] for i in given])
        answered = given[:1] if self.first_only else given
        result = [{"id": i["id"], "output": i["username"].split("@")[0]} for i in answered]
        answer = {"DATA_TYPE": OUT, "result": result + self.extra}
        return CommandOutput(0, json.dumps(answer).encode())


def program(runner: RecordingRunner) -> IdentityMapper:
    return mapper([{"DATA_TYPE": EXT, "command": ["/opt/mapper"]}], runner=runner)


def test_a_program_is_given_the_primary_then_the_linked_identities_by_id() -> None:
    runner = RecordingRunner(first_only=True)
    linked = [BOB, {**ALICE, "status": "closed"}, {"id": "id-0", "username": "zed@x.org"}]
    program(runner).map(identities(PRIMARY, *linked))
    program(runner).map(identities(PRIMARY, *reversed(linked)))
    assert runner.inputs == [["p-0001", "id-0", "id-b"]] * 2


def test_an_order_dependent_program_gives_the_same_result_in_either_order() -> None:
    runner = RecordingRunner(first_only=True)
    one = program(runner).map(identities({"id": "p", "status": "closed"}, ALICE, BOB))
    two = program(runner).map(identities({"id": "p", "status": "closed"}, BOB, ALICE))
    assert one == two and one.username == "alice"


def test_a_program_whose_answers_disagree_is_refused_as_ambiguous() -> None:
    closed_primary = {**PRIMARY, "status": "closed"}  # else its answer would decide
    for order in ([ALICE, BOB], [BOB, ALICE]):
        error = refusal(program(RecordingRunner()), identities(closed_primary, *order))
        assert error.reason == "identity.ambiguous_mapping"
    assert program(RecordingRunner()).map(identities(PRIMARY, BOB, ALICE)).username == "p"


def test_a_program_answering_for_a_closed_identity_fails_closed() -> None:
    runner = RecordingRunner(extra=[{"id": "id-a", "output": "alice"}])
    error = refusal(program(runner), identities(PRIMARY, {**ALICE, "status": "closed"}))
    assert error.reason == "identity.mapper_output_invalid"


def test_no_program_runs_when_no_identity_may_be_mapped() -> None:
    runner = RecordingRunner()
    result = program(runner).map(identities({**ALICE, "status": "closed"}))
    assert result.username is None and runner.inputs == []
