"""Registry pieces that need no processes: error frames, requests, limits before spawning."""

from __future__ import annotations

import asyncio

import pytest

from mepcore.errors import ConfigError, SpawnError, TemplateConfigError
from mepcore.spawn import SpawnSettings
from mepcore.testing import FakeAccountDatabase
from mepd.handle import error_from_frame
from mepd.registry import Registry, RegistryLimits, StartRequest
from mepd.spec import EndpointSpec


def test_config_errors_come_back_with_their_violations() -> None:
    err = error_from_frame(
        {
            "reason": "config.invalid_variables",
            "message": "the user endpoint configuration variables are not valid",
            "detail": "x" * 10_000,
            "violations": [
                {"path": "$.walltime", "message": "too long", "code": "maxLength"},
                "junk",
            ],
            "error_class": "ConfigError",
        }
    )
    assert isinstance(err, ConfigError) and not isinstance(err, TemplateConfigError)
    assert err.to_public()["violations"] == [
        {"path": "$.walltime", "message": "too long", "code": "maxLength"}
    ]
    assert len(err.detail) < 5000


def test_site_template_errors_do_not_expose_violations() -> None:
    err = error_from_frame(
        {
            "reason": "config.template_invalid",
            "violations": [{"path": "$", "message": "m"}],
            "error_class": "TemplateConfigError",
        }
    )
    assert isinstance(err, TemplateConfigError)
    assert "violations" not in err.to_public()


@pytest.mark.parametrize("reason", ["not.a.reason", None, 5, "mep.internal.x"])
def test_unknown_reasons_from_a_user_endpoint_become_start_failed(reason: object) -> None:
    err = error_from_frame({"reason": reason, "message": 7})
    assert isinstance(err, SpawnError) and err.reason == "spawn.start_failed"
    assert err.public_message == "the user endpoint could not be started"


def test_start_fields_carry_what_the_user_endpoint_needs() -> None:
    account = FakeAccountDatabase().add("alice", 2001, groups=[("lab", 3000)])
    req = StartRequest(
        spec=EndpointSpec(
            "default", account.name, {"n": [1, {"k": "v"}]}, {"python_version": "3.11"}, None
        ),
        account=account,
        config_key="abc",
        template_name="t.j2",
        template_text="x",
        includes={"a.j2": "y"},
        environment={},
    )
    fields = req.start_fields()
    assert fields["account"]["uid"] == 2001 and fields["account"]["group_ids"] == [2001, 3000]
    assert fields["variables"] == {"n": [1, {"k": "v"}]}
    assert fields["includes"] == {"a.j2": "y"} and fields["identity"] is None


def test_root_account_is_refused_before_anything_runs() -> None:
    root = FakeAccountDatabase().add("root", 0, 0, home="/root")
    registry = Registry(
        SpawnSettings(python="/usr/bin/python3"),
        RegistryLimits(),
        on_result=lambda *a: None,
        on_lost=lambda *a: None,
    )
    req = StartRequest(
        spec=EndpointSpec("e", root.name, {}, None, None),
        account=root,
        config_key="k",
        template_name="t",
        template_text="",
        includes={},
        environment={},
    )

    async def scenario() -> None:
        try:
            with pytest.raises(SpawnError) as info:
                await registry.get_or_start(req)
            assert info.value.reason == "spawn.privilege_drop"
            assert registry.status() == []
        finally:
            await registry.shutdown()

    asyncio.run(scenario())
