"""The client's serializer and ``mepcore.tasks`` write the same bytes.

The client may not import ``mepcore.tasks`` (L1 components are independent), so it
carries its own copy of the ``dill.v1`` format; these tests (which may import both) keep
the two byte-for-byte equal, so a function has the same id on both sides and payloads
of either load with the other.
"""

from __future__ import annotations

import datetime
import fractions

from hypothesis import given, settings
from hypothesis import strategies as st

from mepcore import client
from mepcore.tasks import serialization as tasks


def triple(x: int) -> int:
    return 3 * x


def test_function_ids_are_equal_for_the_same_function() -> None:
    def local_closure(x: int) -> int:
        return x + len(str(x))

    for fn in (triple, local_closure, lambda y: y * 2, len, datetime.date.fromisoformat):
        assert client.pack_function(fn) == tasks.pack_function(fn)


def test_arguments_packed_by_the_client_load_in_the_tasks_side_and_back() -> None:
    args, kwargs = (1, "two", [3.0]), {"four": {"five": (6,)}}
    mine = client.pack_args(args, kwargs)
    theirs = tasks.pack_args(args, kwargs)
    assert mine == theirs
    assert tasks.unpack_value(mine) == (args, kwargs)
    assert client.unpack_value(theirs) == (args, kwargs)


def test_a_function_packed_by_the_client_runs_from_the_tasks_side() -> None:
    fid, payload = client.pack_function(triple)
    assert tasks.function_id_of(payload) == fid
    assert tasks.unpack_value(payload)(14) == 42


def test_tags_match_the_tasks_registry() -> None:
    assert client.serialize.DEFAULT_TAG == tasks.DEFAULT_STRATEGY
    # Values load with the same tags; functions may also go as source (never loaded
    # by the client: no result is ever sent that way).
    known = set(client.serialize._LOADERS) | set(client.serialize.SERIALIZERS.values())
    assert known == set(tasks.STRATEGIES)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.tuples(children, children)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_like)
def test_values_are_byte_identical_and_load_both_ways(value: object) -> None:
    mine = client.pack_value(value)
    assert mine == tasks.pack_value(value)
    assert tasks.unpack_value(mine) == value
    assert client.unpack_value(mine) == value


def test_results_written_by_the_tasks_side_load_in_the_client() -> None:
    value = {"when": datetime.date(2024, 7, 21), "ratio": fractions.Fraction(1, 3)}
    bounded = tasks.pack_value_bounded(value, 1 << 20)
    assert client.unpack_value(bounded) == value
    pickled = tasks.pack_value(value, "pickle.v1")
    assert client.unpack_value(pickled) == value
