"""mepd.runtime: asking an interpreter where the user endpoint's packages live."""

from __future__ import annotations

import os
import sys

import pytest

import mepd
from mepcore.errors import SpawnError
from mepd.runtime import probe_package_paths


def test_probe_lists_existing_package_directories() -> None:
    paths = probe_package_paths(sys.executable)
    assert all(os.path.isdir(p) for p in paths)
    assert os.path.dirname(os.path.realpath(mepd.__file__)) in paths
    assert len(paths) == len(set(paths))


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/python3"])
def test_an_unusable_interpreter_is_a_settings_error(python: str) -> None:
    with pytest.raises(SpawnError) as info:
        probe_package_paths(python)
    assert info.value.reason == "spawn.settings_invalid"
