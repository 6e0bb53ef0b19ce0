"""Per-identity request rate limits: one token bucket per task owner.

Each authenticated request takes a token from its owner's bucket (``Caller.owner``: the
issuer and the identity id, the key tasks are owned by). A bucket holds at most
``burst`` tokens and refills at ``rate`` tokens per second; a request that finds it
empty is refused with 429 ``api.rate_limited`` and a ``Retry-After`` of the seconds
until the next token. The check costs a dictionary lookup and a few float operations,
so refusing a flood is much cheaper than serving it — that is what keeps another
identity's latency (bench/ratelimit.py).

The table is bounded (``max_keys``): the least recently seen owners are forgotten first,
and a forgotten owner starts again with a full bucket. Deliberately not here: limits per
peer address (``mepd.edge`` bounds connections) and anything before authentication.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import attrs


@attrs.define
class RateLimiter:
    """Token buckets keyed by owner. ``take(owner)`` is 0.0 when the request may go on,
    else the seconds until it could."""

    rate: float
    burst: int
    max_keys: int = 100_000
    clock: Callable[[], float] = time.monotonic
    # owner -> (tokens left, when they were counted); insertion order = least recent first
    _buckets: dict[str, tuple[float, float]] = attrs.field(factory=dict, init=False)

    def take(self, owner: str) -> float:
        now = self.clock()
        tokens, counted = self._buckets.pop(owner, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[owner] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))
