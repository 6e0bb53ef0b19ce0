"""Which user endpoint a task needs: the one value that names it across the daemon.

The submit step builds an ``EndpointSpec`` from a caller's request (after validation);
the store keeps it so that a queued task can find its user endpoint again after a
restart; the registry starts a process from it (with the site's files beside it, in
``mepd.registry.StartRequest``). Its ``spec_id`` is a digest of its content, so equal
requests share one stored row.

Deliberately not here: the account's uid and groups (looked up again at every use,
DESIGN.md §3.9), the config key (it depends on the template in force), the files.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

import attrs

from mepcore.types import Identity


def _plain(value: Mapping[str, Any] | None) -> dict[str, Any]:
    # A JSON round trip: a deep copy that also proves the value is plain JSON.
    return dict(json.loads(json.dumps(dict(value or {}), sort_keys=True)))


@attrs.frozen
class EndpointSpec:
    """An endpoint (site) name, an account name, validated variables, the caller's
    primary identity and the runtime their client reported."""

    endpoint: str
    account: str
    variables: dict[str, Any] = attrs.field(converter=_plain, factory=dict)
    user_runtime: dict[str, Any] = attrs.field(converter=_plain, factory=dict)
    identity: Identity | None = None

    @functools.cached_property
    def spec_id(self) -> str:
        # Computed once per spec (the submit and the store both ask): its fields are
        # frozen, and the converters made them private copies.
        identity = {} if self.identity is None else self.identity.to_dict()
        document = [self.endpoint, self.account, self.variables, self.user_runtime, identity]
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
