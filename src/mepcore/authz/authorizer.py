"""The authorizer: requests in, decisions out, on the shipped Casbin model.

``Authorizer.from_text``/``from_files`` check the model, validate every policy line
(refusing a broken one with its file and line) and build the index; ``decide`` returns
a ``Decision`` — a denial is a value, never an exception. Default deny: a request no
line allows is denied, and a matching deny line beats every allow line.

Decisions are cached in a bounded LRU keyed on everything that can change the answer:
the request's endpoint, object, action, principals and MFA flag, and — only when the
policy uses the matching predicates — the request's position among the policy's
``auth_age_le`` and ``uid_ge`` thresholds and the hour of the day from the injected
clock. Two requests with the same key get the same decision from the matcher, so the
cache can never answer differently from an uncached evaluation.

``AuthorizerHolder`` keeps the authorizer in force and swaps in a new one on reload; a
policy that fails to load leaves the old one in place. There is no switch that turns
authorization off. Deliberately not here: logging (the daemon logs decisions), file
watching, and policy editing.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import threading
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from typing import Any

import attrs

from mepcore.authz.index import PolicyIndex
from mepcore.authz.model import check_model
from mepcore.authz.policy import ACTIONS, PolicyLine, Rule, parse_policy
from mepcore.authz.predicates import RequestContext
from mepcore.errors import AuthzConfigError, AuthzError
from mepcore.ports import Clock, SystemClock
from mepcore.types import Account, IdentitySet

MAX_PRINCIPALS = 256
MAX_VALUE_LENGTH = 1024
# A principal is a kind and a value (``username:`` + an identity field of up to 1,024
# characters, the most a token may carry): room for the longest kind.
MAX_PRINCIPAL_LENGTH = MAX_VALUE_LENGTH + 32
MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_SIZE = 4096

StrPath = str | PathLike[str]


def _invalid(message: str) -> AuthzError:
    return AuthzError("authz.request_invalid", message)


def _check_text(name: str, value: object, limit: int = MAX_VALUE_LENGTH) -> None:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _invalid(f"{name} must be a non-empty string of at most {limit}")
    if not value.isprintable():
        raise _invalid(f"{name} must not contain control characters")


def principals_of(identities: IdentitySet, account: Account | None) -> tuple[str, ...]:
    """The principals of a caller, in order and without repeats: ``issuer:<iss>`` (the
    token issuer, the ``iss`` field of the primary identity, when set), for each
    identity ``id:<id>``, ``username:<username>`` and ``domain:<domain>`` (the last two
    when set), then, when the caller was mapped to a local account, ``user:<name>`` and
    ``group:<group>`` for each of the account's groups."""
    found: list[str] = []
    issuer = identities.primary.get("iss")
    if isinstance(issuer, str) and issuer:
        found.append(f"issuer:{issuer}")
    for identity in identities:
        found.append(f"id:{identity.id}")
        if identity.username:
            found.append(f"username:{identity.username}")
        if identity.domain:
            found.append(f"domain:{identity.domain}")
    if account is not None:
        found.append(f"user:{account.name}")
        found.extend(f"group:{group}" for group in account.group_names)
    return tuple(dict.fromkeys(found))


def _principals(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _invalid("principals must be a list of strings, not one string")
    return tuple(value)


@attrs.frozen
class AuthzRequest:
    """What is asked, by whom: built by the daemon after identity mapping.

    ``principals`` are ``issuer:<token issuer>``, ``id:<identity id>``,
    ``username:<name>``, ``domain:<domain>``, ``user:<local account>``,
    ``group:<local group>``; ``auth_age`` is the age of the
    authentication in seconds; ``uid`` the mapped local uid.
    """

    endpoint: str
    obj: str
    action: str
    principals: tuple[str, ...] = attrs.field(converter=_principals)
    mfa: bool = False
    auth_age: float | None = None
    uid: int | None = None

    def __attrs_post_init__(self) -> None:
        _check_text("endpoint", self.endpoint)
        _check_text("obj", self.obj)
        if self.action not in ACTIONS:
            raise _invalid(f"unknown action {self.action!r}")
        if len(self.principals) > MAX_PRINCIPALS:
            raise _invalid(f"at most {MAX_PRINCIPALS} principals")
        for principal in self.principals:
            _check_text("a principal", principal, MAX_PRINCIPAL_LENGTH)
        if not isinstance(self.mfa, bool):
            raise _invalid("mfa must be a boolean")
        age = self.auth_age
        if age is not None and (
            isinstance(age, bool)
            or not isinstance(age, int | float)
            or not math.isfinite(age)
            or age < 0
        ):
            raise _invalid("auth_age must be a finite number of seconds >= 0, or null")
        uid = self.uid
        if uid is not None and (isinstance(uid, bool) or not isinstance(uid, int) or uid < 0):
            raise _invalid("uid must be an integer >= 0, or null")

    @classmethod
    def from_mapping(cls, data: Any) -> AuthzRequest:
        """From a JSON object (``mepd policy explain``, decision tables)."""
        import jsonschema

        try:
            jsonschema.validate(data, REQUEST_SCHEMA)
        except jsonschema.ValidationError as exc:
            path = "$" + "".join(f"[{p!r}]" for p in exc.absolute_path)
            raise _invalid(f"{path}: {exc.message}") from exc
        return cls(
            endpoint=data["endpoint"],
            obj=data["obj"],
            action=data["action"],
            principals=tuple(data.get("principals", ())),
            mfa=data.get("mfa", False),
            auth_age=data.get("auth_age"),
            uid=data.get("uid"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "obj": self.obj,
            "action": self.action,
            "principals": list(self.principals),
            "mfa": self.mfa,
            "auth_age": self.auth_age,
            "uid": self.uid,
        }


REQUEST_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint", "obj", "action"],
    "properties": {
        "endpoint": {"type": "string", "minLength": 1, "maxLength": MAX_VALUE_LENGTH},
        "obj": {"type": "string", "minLength": 1, "maxLength": MAX_VALUE_LENGTH},
        "action": {"enum": sorted(ACTIONS)},
        "principals": {
            "type": "array",
            "maxItems": MAX_PRINCIPALS,
            "items": {"type": "string", "minLength": 1, "maxLength": MAX_PRINCIPAL_LENGTH},
        },
        "mfa": {"type": "boolean"},
        "auth_age": {"type": ["number", "null"], "minimum": 0},
        "uid": {"type": ["integer", "null"], "minimum": 0},
    },
}


@attrs.frozen
class Decision:
    """The answer: allowed or not, why (a ``REASONS`` code), the responsible lines."""

    allowed: bool
    reason: str
    lines: tuple[PolicyLine | str, ...]
    policy_version: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "reason": self.reason,
            "lines": [
                line.to_dict() if isinstance(line, PolicyLine) else {"text": line}
                for line in self.lines
            ],
            "policy_version": self.policy_version,
        }


@attrs.frozen
class Explanation:
    """Everything a request touched (for ``mepd policy explain`` and coverage)."""

    decision: Decision
    matched: tuple[PolicyLine, ...]
    condition_failed: tuple[PolicyLine, ...]
    links: tuple[PolicyLine, ...]

    @property
    def touched(self) -> tuple[PolicyLine, ...]:
        return self.matched + self.condition_failed + self.links

    def to_dict(self) -> dict[str, Any]:
        out = self.decision.to_dict()
        out["matched"] = [line.to_dict() for line in self.matched]
        out["condition_failed"] = [line.to_dict() for line in self.condition_failed]
        out["links"] = [line.to_dict() for line in self.links]
        return out


def _lines(rules: Iterable[Rule]) -> tuple[PolicyLine, ...]:
    return tuple(rule.line for rule in sorted(rules, key=lambda r: r.order))


def _version(model: str, sources: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for part in (model, *(text for _, text in sources)):
        data = part.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def _read(path: StrPath, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AuthzConfigError(
            "authz.model_invalid" if what == "model" else "authz.policy_invalid",
            f"{path}: cannot read the {what}: {exc.strerror or exc}",
        ) from exc
    reason = "authz.model_invalid" if what == "model" else "authz.policy_invalid"
    if len(data) > MAX_FILE_BYTES:
        raise AuthzConfigError(reason, f"{path}: the {what} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthzConfigError(reason, f"{path}: the {what} is not UTF-8 ({exc.reason})") from exc


@attrs.define
class Authorizer:
    """Decides requests against one loaded model and policy. Build it with
    ``from_text`` or ``from_files``; it never changes afterwards (except its cache)."""

    index: PolicyIndex
    version: str
    model_text: str
    policy_sources: tuple[tuple[str, str], ...]
    clock: Clock = attrs.field(factory=SystemClock)
    timezone: datetime.tzinfo = datetime.UTC
    cache_size: int = DEFAULT_CACHE_SIZE
    _cache: OrderedDict[tuple[Any, ...], Decision] = attrs.field(init=False, factory=OrderedDict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    @classmethod
    def from_sources(
        cls,
        model: str,
        sources: Sequence[tuple[str, str]],
        *,
        clock: Clock | None = None,
        model_source: str = "<model>",
        timezone: datetime.tzinfo = datetime.UTC,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> Authorizer:
        """From a model text and several ``(source name, policy text)`` pairs."""
        check_model(model, model_source)
        lines: list[PolicyLine] = []
        for source, text in sources:
            lines.extend(parse_policy(text, source))
        return cls(
            index=PolicyIndex(lines),
            version=_version(model, sources),
            model_text=model,
            policy_sources=tuple(sources),
            clock=clock or SystemClock(),
            timezone=timezone,
            cache_size=cache_size,
        )

    @classmethod
    def from_text(
        cls,
        model: str,
        policy: str,
        *,
        clock: Clock | None = None,
        source: str = "<policy>",
        timezone: datetime.tzinfo = datetime.UTC,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> Authorizer:
        return cls.from_sources(
            model, [(source, policy)], clock=clock, timezone=timezone, cache_size=cache_size
        )

    @classmethod
    def from_files(
        cls,
        model_path: StrPath,
        policy_path: StrPath | Sequence[StrPath],
        *,
        clock: Clock | None = None,
        timezone: datetime.tzinfo = datetime.UTC,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> Authorizer:
        """From a model file and one policy file or several (read in order)."""
        paths = [policy_path] if isinstance(policy_path, str | PathLike) else list(policy_path)
        model = _read(model_path, "model")
        sources = [(str(path), _read(path, "policy")) for path in paths]
        return cls.from_sources(
            model,
            sources,
            clock=clock,
            model_source=str(model_path),
            timezone=timezone,
            cache_size=cache_size,
        )

    @property
    def lines(self) -> tuple[PolicyLine, ...]:
        return self.index.lines

    def context(self, request: AuthzRequest) -> RequestContext:
        """The condition context of a request (the hour from this authorizer's clock)."""
        return RequestContext(
            mfa=request.mfa, auth_age=request.auth_age, uid=request.uid, hour=self._hour()
        )

    def _hour(self) -> int | None:
        if not self.index.uses_hours:
            return None
        return datetime.datetime.fromtimestamp(self.clock.now(), self.timezone).hour

    def _cache_key(self, request: AuthzRequest, hour: int | None) -> tuple[Any, ...]:
        index = self.index
        age_bucket: int | None = None
        if index.auth_age_thresholds:
            age = request.auth_age
            age_bucket = -1 if age is None else bisect_left(index.auth_age_thresholds, age)
        uid_bucket: int | None = None
        if index.uid_thresholds:
            uid = request.uid
            uid_bucket = -1 if uid is None else bisect_right(index.uid_thresholds, uid)
        return (
            request.endpoint,
            request.obj,
            request.action,
            request.principals,
            request.mfa,
            age_bucket,
            uid_bucket,
            hour,
        )

    def decide(self, request: AuthzRequest) -> Decision:
        """Allowed or denied, with the reason and the responsible lines."""
        hour = self._hour()
        key = self._cache_key(request, hour)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        decision = self._evaluate(request, hour)
        if self.cache_size > 0:
            with self._lock:
                self._cache[key] = decision
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return decision

    def decide_uncached(self, request: AuthzRequest) -> Decision:
        """``decide`` without the cache (benchmarks and tests of the cache itself)."""
        return self._evaluate(request, self._hour())

    def _evaluate(self, request: AuthzRequest, hour: int | None) -> Decision:
        ctx = RequestContext(mfa=request.mfa, auth_age=request.auth_age, uid=request.uid, hour=hour)
        found = self.index.match(
            request.endpoint, request.obj, request.action, request.principals, ctx
        )
        if found.deny:
            return Decision(False, "authz.explicit_deny", _lines(found.deny), self.version)
        if found.allow:
            return Decision(True, "authz.allowed", _lines(found.allow), self.version)
        failed_allows = [r for r in found.condition_failed if r.effect == "allow"]
        if failed_allows:
            return Decision(False, "authz.condition_failed", _lines(failed_allows), self.version)
        return Decision(False, "authz.denied", (), self.version)

    def explain(self, request: AuthzRequest) -> Explanation:
        """The decision and every line the request touched (uncached)."""
        hour = self._hour()
        ctx = RequestContext(mfa=request.mfa, auth_age=request.auth_age, uid=request.uid, hour=hour)
        found = self.index.match(
            request.endpoint, request.obj, request.action, request.principals, ctx
        )
        rules = found.allow + found.deny + found.condition_failed
        links = self.index.touched_links(request.endpoint, request.obj, request.principals, rules)
        return Explanation(
            decision=self._evaluate(request, hour),
            matched=_lines(found.allow + found.deny),
            condition_failed=_lines(found.condition_failed),
            links=tuple(links),
        )


@attrs.define
class AuthorizerHolder:
    """The authorizer in force; ``reload`` swaps in a new one only if it loads."""

    _current: Authorizer
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    @property
    def current(self) -> Authorizer:
        return self._current

    def decide(self, request: AuthzRequest) -> Decision:
        return self._current.decide(request)

    def reload(
        self,
        model_path: StrPath,
        policy_path: StrPath | Sequence[StrPath],
        *,
        clock: Clock | None = None,
    ) -> Authorizer:
        """Load the files into a new authorizer and put it in force. On any
        ``AuthzConfigError`` the previous authorizer stays in force and the error
        propagates."""
        old = self._current
        new = Authorizer.from_files(
            model_path,
            policy_path,
            clock=clock or old.clock,
            timezone=old.timezone,
            cache_size=old.cache_size,
        )
        with self._lock:
            self._current = new
        return new

    def replace(self, authorizer: Authorizer) -> None:
        with self._lock:
            self._current = authorizer
