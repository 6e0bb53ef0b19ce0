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
