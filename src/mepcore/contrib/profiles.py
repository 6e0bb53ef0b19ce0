"""May an account start a profile: a mep Casbin policy asked what mepd asks.

``SpawnGate`` asks the two questions mepd asks before it starts a user endpoint:
``map_identity`` on ``user:<account>`` and ``start_endpoint`` on ``template:<profile>``,
in the policy's endpoint (Casbin's domain) the service is configured as. A denial is a
returned ``SpawnDecision`` carrying the policy's reason and the responsible lines;
``SpawnDecision.to_error`` makes it mep's ``AuthzError`` when a caller wants to raise.
``allowed_profiles`` filters the profiles a service offers.

Deliberately not here: which account the caller is (``mepcore.contrib.login``), what a
profile means to the service (an image, a partition: the service applies it after the
policy allowed it), and logging.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from os import PathLike

import attrs

from mepcore.authz import (
    MODEL_TEXT,
    Authorizer,
    AuthzRequest,
    Decision,
    PolicyLine,
    principals_of,
)
from mepcore.errors import REASONS, AuthzConfigError, AuthzError
from mepcore.ports import Clock
from mepcore.types import Account, IdentitySet

__all__ = ["DEFAULT_ENDPOINT", "SpawnDecision", "SpawnGate"]

# The policy's endpoint (Casbin domain) a service is, unless configured otherwise.
DEFAULT_ENDPOINT = "jupyterhub"
# Policy files are read up to this size, as the authorizer reads them.
MAX_POLICY_BYTES = 64 * 1024 * 1024

StrPath = str | PathLike[str]


def _policy_text(path: StrPath) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise AuthzConfigError(
            "authz.policy_invalid", f"{path}: cannot read the policy: {exc.strerror or exc}"
        ) from exc
    if len(data) > MAX_POLICY_BYTES:
        raise AuthzConfigError(
            "authz.policy_invalid", f"{path}: the policy is larger than {MAX_POLICY_BYTES} bytes"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AuthzConfigError(
            "authz.policy_invalid", f"{path}: the policy is not UTF-8 ({exc.reason})"
        ) from exc


@attrs.frozen
class SpawnDecision:
    """May an account start a profile: the first question the policy denied, or the
    last one it allowed, with the ``Decision`` that answered it."""

    profile: str
    obj: str
    action: str
    decision: Decision

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def reason(self) -> str:
        """The policy's reason code (``authz.allowed``, ``authz.explicit_deny``,
        ``authz.condition_failed``, ``authz.denied``)."""
        return self.decision.reason

    @property
    def public_message(self) -> str:
        """What the person asking may read: the reason's public message and its code."""
        return f"{REASONS.get(self.reason, REASONS['authz.denied'])} ({self.reason})"

    @property
    def detail(self) -> str:
        """For the service's log: the question, the reason and the responsible lines."""
        lines = "; ".join(
            f"{line.location}: {line}" if isinstance(line, PolicyLine) else str(line)
            for line in self.decision.lines
        )
        return (
            f"{self.action} on {self.obj}: {self.reason}"
            + (f" by {lines}" if lines else " (no policy line matched)")
            + f" [{self.decision.policy_version}]"
        )

    def to_error(self) -> AuthzError:
        """The refusal as mep's error (its ``reason`` the policy's denial reason)."""
        reason = self.reason
        if not reason.startswith("authz.") or reason == "authz.allowed" or reason not in REASONS:
            reason = "authz.denied"
        return AuthzError(reason, self.detail, context={"profile": self.profile})


@attrs.frozen
class SpawnGate:
    """A mep Casbin policy, asked whether an account may start a profile.

    ``endpoint`` is the policy's endpoint (Casbin domain) the service is: policy lines
    for it name it, or match it with ``*``."""

    authorizer: Authorizer
    endpoint: str = DEFAULT_ENDPOINT

    @classmethod
    def from_files(
        cls,
        policy: StrPath | Sequence[StrPath],
        *,
        model: StrPath | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        clock: Clock | None = None,
    ) -> SpawnGate:
        """From policy files (read in order) and the model file, or mep's shipped model
        when ``model`` is None. ``AuthzConfigError`` names the file and line of a
        broken policy."""
        paths = [policy] if isinstance(policy, str | PathLike) else list(policy)
        if model is not None:
            return cls(Authorizer.from_files(model, paths, clock=clock), endpoint)
        sources = [(str(path), _policy_text(path)) for path in paths]
        return cls(Authorizer.from_sources(MODEL_TEXT, sources, clock=clock), endpoint)

    def principals(self, account: Account, identities: IdentitySet | None) -> tuple[str, ...]:
        """The caller's principals as mepd names them; without identities (the login is
        not known any more) only ``user:`` and ``group:``."""
        if identities is not None:
            return principals_of(identities, account)
        names = [f"user:{account.name}", *(f"group:{g}" for g in account.group_names)]
        return tuple(dict.fromkeys(names))

    def decide(
        self,
        account: Account,
        profile: str,
        *,
        identities: IdentitySet | None = None,
        mfa: bool = False,
        auth_age: float | None = None,
    ) -> SpawnDecision:
        """Ask ``map_identity`` on ``user:<account>``, then ``start_endpoint`` on
        ``template:<profile>``; the first denial is the answer. A profile name the policy
        cannot express (empty, control characters) raises ``AuthzError``
        (``authz.request_invalid``)."""
        principals = self.principals(account, identities)

        def ask(obj: str, action: str) -> SpawnDecision:
            request = AuthzRequest(
                endpoint=self.endpoint,
                obj=obj,
                action=action,
                principals=principals,
                mfa=mfa,
                auth_age=auth_age,
                uid=account.uid,
            )
            return SpawnDecision(profile, obj, action, self.authorizer.decide(request))

        mapped = ask(f"user:{account.name}", "map_identity")
        if not mapped.allowed:
            return mapped
        return ask(f"template:{profile}", "start_endpoint")

    def allowed_profiles(
        self,
        account: Account,
        profiles: Iterable[str],
        *,
        identities: IdentitySet | None = None,
    ) -> tuple[str, ...]:
        """The profiles, in the order given, this account may start."""
        return tuple(
            profile
            for profile in profiles
            if self.decide(account, profile, identities=identities).allowed
        )
