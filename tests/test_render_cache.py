"""The render cache (mepd.rendercache): what a user endpoint rendered is kept under a key
of everything the rendering read, bounded in count and size, and read back as an equal
configuration. The real starts that use it are in tests/test_registry_root.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mepcore.config import EndpointConfig, parse_endpoint_config
from mepd.rendercache import MAX_ENTRY_BYTES, RenderCache, render_key
from tests.test_config_endpoint import SLURM

FIELDS: dict[str, Any] = {
    "template_name": "user_config_template.yaml.j2",
    "template_text": "engine:\n  type: {{ engine }}\n",
    "includes": {"part.j2": "x: 1"},
    "variables": {"engine": "ThreadPoolEngine"},
    "identity": {"id": "i1", "username": "alice@example.org"},
    "user_runtime": None,
    "account": {"name": "alice", "uid": 1001, "gid": 1001, "home": "/home/alice"},
    "endpoint": "default",
    "config_key": "k1",
    "parent_config": {},
}
ENV = {"SITE_NAME": "test"}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("template_text",), "engine:\n  type: {{ engine }} \n"),
        (("includes", "part.j2"), "x: 2"),
        (("variables", "engine"), "ProcessPoolEngine"),
        (("identity", "username"), "mallory@example.org"),
        (("account", "uid"), 1002),
        (("account", "gid"), 1002),
        (("account", "name"), "bob"),
        (("account", "home"), "/home/bob"),
        (("endpoint",), "other"),
        (("parent_config",), {"display_name": "x"}),
    ],
)
def test_the_key_changes_with_every_input_of_the_rendering(
    path: tuple[str, ...], value: Any
) -> None:
    changed = json.loads(json.dumps(FIELDS))
    target = changed
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    assert render_key(changed, ENV) != render_key(FIELDS, ENV)


def test_the_key_changes_with_the_environment_and_not_with_key_order() -> None:
    assert render_key(FIELDS, {"SITE_NAME": "other"}) != render_key(FIELDS, ENV)
    reordered = dict(reversed(list(FIELDS.items())))
    assert render_key(reordered, ENV) == render_key(FIELDS, ENV)


def test_entries_are_bounded_least_recently_used_first() -> None:
    cache = RenderCache(entries=2)
    assert cache.put("a", {"n": 1}) and cache.put("b", {"n": 2})
    assert cache.get("a") == {"n": 1}  # a is now the most recent
    assert cache.put("c", {"n": 3})
    assert cache.get("b") is None and cache.get("a") == {"n": 1} and len(cache) == 2


def test_only_a_json_object_within_the_size_bound_is_kept() -> None:
    cache = RenderCache()
    assert not cache.put("list", ["engine"])
    assert not cache.put("text", "engine: x")
    assert not cache.put("big", {"display_name": "x" * MAX_ENTRY_BYTES})
    assert len(cache) == 0
    off = RenderCache(entries=0)
    assert not off.put("a", {"n": 1}) and off.get("a") is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        SLURM,
        "engine:\n  type: ProcessPoolEngine\n  max_workers: 3\nallowed_functions: []\n",
        "engine:\n  type: ThreadPoolEngine\nendpoint_setup: echo hi\nheartbeat_period: 0.5\n",
    ],
)
def test_a_reported_configuration_reads_back_equal(text: str) -> None:
    config = parse_endpoint_config(text)
    document = json.loads(json.dumps(config.to_document()))  # as the channel carries it
    assert EndpointConfig.from_mapping(document) == config
