"""Per-identity request rate limits: one token bucket per task owner.

Each authenticated request takes a token from its owner's bucket (``Caller.owner``: the
issuer and the identity id, the key tasks are owned by). A bucket holds at most
``burst`` tokens and refills at ``rate`` tokens per second; a request that finds it
empty is refused with 429 ``api.rate_limited`` and a ``Retry-After`` of the seconds
until the next token. The check costs a dictionary lookup and a few float operations,
so refusing a flood is much cheaper than serving it — that is what keeps another
identity's latency (bench/ratelimit.py).

The table is bounded (``max_keys``): the least recently seen owners are forgotten first,
and a forgotten owner starts again with a full bucket.

``Gate`` makes the refusal of a flood cheaper still: it remembers which owner a bearer
token was verified for (by a digest of the token, bounded), and ``mepd.api`` asks it
before routing and verifying anything — a token whose owner's bucket is empty is refused
at once. It only ever *refuses* on that memory (``peek`` takes nothing from a bucket): a
stale or stolen token cannot spend its owner's requests; every request that goes on is
verified and counted as usual. Deliberately not here: limits per peer address
(``mepd.edge`` bounds connections) and the verification of tokens (``mepd.auth``).
"""

from __future__ import annotations

import hashlib
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

    def peek(self, owner: str) -> float:
        """What ``take`` would answer, without taking."""
        held = self._buckets.get(owner)
        if held is None:
            return 0.0
        tokens, counted = held
        tokens = min(float(self.burst), tokens + (self.clock() - counted) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    @staticmethod
    def retry_after(wait: float) -> int:
        """``wait`` as a ``Retry-After`` value: whole seconds, at least 1."""
        return max(1, math.ceil(wait))


@attrs.define
class Gate:
    """Owners of bearer tokens verified before, for refusing a flood before verifying."""

    limiter: RateLimiter
    max_tokens: int = 10_000
    _owners: dict[bytes, str] = attrs.field(factory=dict, init=False)

    @staticmethod
    def key(authorization: bytes) -> bytes:
        """What the gate keeps of an ``Authorization`` value (a digest, not the token);
        the API computes it once per request for ``refusal`` and ``remember``."""
        return hashlib.blake2b(authorization, digest_size=16).digest()

    def remember(self, authorization: str, owner: str, key: bytes | None = None) -> None:
        if key is None:
            key = self.key(authorization.encode("latin-1", "replace"))
        if key not in self._owners:
            if len(self._owners) >= self.max_tokens:
                del self._owners[next(iter(self._owners))]
            self._owners[key] = owner

    def refusal(self, authorization: bytes, key: bytes | None = None) -> tuple[str, float] | None:
        """(owner, seconds to wait) when this token's owner has no request left."""
        owner = self._owners.get(self.key(authorization) if key is None else key)
        if owner is None:
            return None
        wait = self.limiter.peek(owner)
        return (owner, wait) if wait > 0.0 else None
