"""Shared pytest set-up: the ``root`` marker and helpers for tests with real accounts."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root: creates real accounts with useradd (run as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def make_account():  # type: ignore[no-untyped-def]
    """Factory fixture: ``make_account(groups=[...])`` creates a real account (root only);
    every account made is removed at teardown."""
    from tests.accounts import create_account, delete_account

    if os.geteuid() != 0:
        pytest.skip("needs root: creates real accounts with useradd")
    made: list[str] = []

    def factory(**kwargs):  # type: ignore[no-untyped-def]
        entry = create_account(**kwargs)
        made.append(entry.pw_name)
        return entry

    yield factory
    for name in made:
        delete_account(name)
