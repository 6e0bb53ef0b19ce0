"""Endpoint configurations rendered before, kept for the next start from the same inputs.

A user endpoint renders its configuration itself, as the user, after the privilege drop
(DESIGN.md §3.5), and reports the result in its ``ready`` frame. The registry keeps it
here, under a key that is a hash of *everything* the rendering read: the start message
(template text and includes, the caller's variables, identity and runtime, the account
with its uid, gid, groups and home, the endpoint and its parent settings, the limits)
and the environment the user endpoint is given. The next start of a user endpoint with
the same key gets the kept configuration in its start message and uses it instead of
rendering (``mepd.uep.server.UserEndpoint._configure``), which spares it the import of
jinja2 and yaml and the rendering: about a third of a start (docs/performance.md).

Why this is safe: a configuration is only ever handed back to a user endpoint of the
account that produced it — the account is part of the key — so what a user could put
into it by tampering with their own user endpoint they could run as themselves anyway.
The daemon never interprets it (it is an opaque JSON object, bounded in size), and the
user endpoint validates it like a freshly rendered one. Any change of the template, an
include, the variables or the account gives another key, so the next start renders.
The cache lives in the daemon's memory only; a restart of mepd empties it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import attrs

# Entries kept (least recently used go first), and the size of one, as JSON.
DEFAULT_ENTRIES = 256
MAX_ENTRY_BYTES = 64 * 1024


def render_key(start_fields: Mapping[str, Any], environment: Mapping[str, str]) -> str:
    """The hash of everything a rendering reads."""
    document = json.dumps(
        {"start": start_fields, "environment": dict(environment)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(document.encode()).hexdigest()


@attrs.define
class RenderCache:
    """Rendered configurations by ``render_key``; ``entries`` 0 keeps none."""

    entries: int = DEFAULT_ENTRIES
    _kept: OrderedDict[str, dict[str, Any]] = attrs.field(factory=OrderedDict)

    def get(self, key: str) -> dict[str, Any] | None:
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
        return found

    def put(self, key: str, rendered: object) -> bool:
        """Keep what a user endpoint reported (a JSON object within the size bound)."""
        if self.entries <= 0 or not isinstance(rendered, dict):
            return False
        if len(json.dumps(rendered, separators=(",", ":"))) > MAX_ENTRY_BYTES:
            return False
        self._kept[key] = rendered
        self._kept.move_to_end(key)
        while len(self._kept) > self.entries:
            self._kept.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._kept)
