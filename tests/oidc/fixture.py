"""The session's OpenID provider (one node process for the whole test run)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.oidc import ENV, OpenIDProvider, running_provider, unavailable


@pytest.fixture(scope="session")
def oidc_provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIDProvider]:
    reason = unavailable()
    if reason is not None and os.environ.get(ENV):
        # .ci/run sets the variable after installing: there a missing provider fails.
        pytest.fail(f"no OpenID provider although {ENV} is set: {reason}")
    if reason is not None:
        pytest.skip(f"no OpenID provider: {reason}")
    log = tmp_path_factory.mktemp("oidc") / "provider.log"
    with running_provider(log) as provider:
        yield provider
