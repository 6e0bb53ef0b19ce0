"""JupyterHub with mep's decisions: the mapping names the account, the policy the profiles.

``MepAuthenticatorMixin`` goes in front of the authenticator that checks the login
(OAuth, LDAP, PAM, …) and makes three of JupyterHub's decisions mep's:

- **which local account** a login is: the name the authenticator returns is mapped with
  a mep identity-mapping file and checked with mep's account checks (``LoginGate``); the
  JupyterHub user *is* that account (``LocalProcessSpawner`` and its kin start the
  server as it). A login that does not map, or maps to an account mep refuses (uid 0, a
  low uid, missing, locked…), is refused with mep's public reason; the hub log gets the
  detail. Names are kept exactly (no lower-casing: they are account names). A mapped
  login is allowed in; ``allowed_users`` and ``blocked_users`` still apply.
- **whether it may start a server, with which profile**: before every spawn the account
  is checked again and a mep Casbin policy is asked what mepd asks before it starts a
  user endpoint (``map_identity`` on ``user:<account>``, ``start_endpoint`` on
  ``template:<profile>``, in the endpoint ``mep_endpoint``). A denial refuses the spawn
  with the policy's reason (``the policy does not allow this request
  (authz.explicit_deny)``); the hub log names the responsible policy lines.
- **which profiles it is offered**: ``mep_options_form`` (for ``Spawner.options_form``)
  lists the profiles of ``mep_profiles`` the policy allows the account, and
  ``mep_options_from_form`` reads the choice back as ``user_options["profile"]``.
  What a profile means (an image, a partition, limits) stays the spawner's business
  (``Spawner.apply_user_options``), applied only after the policy allowed it.

Policies see the principals mepd would give the caller: ``user:<account>`` and
``group:<group>`` for each of the account's groups, and — when JupyterHub keeps
``auth_state`` (``enable_auth_state``) — ``id:``/``username:``/``domain:`` of the login.

The mapping file and the policy are read once, when the hub starts (a broken file stops
the start, naming the file and line); restart the hub after changing them.

Deliberately not here: authenticating the login (the authenticator this mixin goes in
front of does that), spawning (the spawner), and anything JupyterHub already decides.
This is the only module of the project that imports JupyterHub, traitlets or tornado.
"""

from __future__ import annotations

import asyncio
import html
import os
from typing import Any

from jupyterhub.utils import maybe_future
from tornado import web
from traitlets import Bool, Dict, Float, Integer, List, Set, Unicode
from traitlets.config import LoggingConfigurable

from mepcore.contrib.login import LoginGate, MappedLogin
from mepcore.contrib.profiles import DEFAULT_ENDPOINT, SpawnGate
from mepcore.errors import IdentityError, MepError
from mepcore.identity import AccountPolicy
from mepcore.ports import SystemShadowDatabase
from mepcore.types import Account, IdentitySet

__all__ = [
    "LOGIN_STATE_KEY",
    "MepAuthenticatorMixin",
    "mep_options_form",
    "mep_options_from_form",
]

# Where the login name is kept in JupyterHub's auth_state (when it keeps auth_state).
LOGIN_STATE_KEY = "mep_login"
# JupyterHub's SpawnException (6.0+) marks a refusal by policy: no traceback in the log,
# the spawn counted as a failure with our reason. Older hubs get an HTTPError.
try:
    from jupyterhub.spawner import SpawnException as _SpawnException
except ImportError:  # pragma: no cover - JupyterHub 5
    _SpawnException = None


def _refusal(message: str, reason: str, log_message: str) -> web.HTTPError:
    """An HTTP 403 whose page and progress events show ``message`` and only that;
    ``log_message`` (the administrator's detail) goes to the hub log."""
    error: web.HTTPError
    if _SpawnException is not None:
        error = _SpawnException(message, reason=reason, log_message=log_message, status_code=403)
    else:  # pragma: no cover - JupyterHub 5
        error = web.HTTPError(403, "%s", message)
    # JupyterHub shows this attribute instead of str(error) (which has the detail);
    # tornado's type does not declare it, hence setattr.
    setattr(error, "jupyterhub_message", message)  # noqa: B010
    return error


def _public(exc: MepError) -> str:
    return f"{exc.public_message} ({exc.reason})"


def _admin(exc: MepError) -> str:
    return f"{exc.admin_reason}: {exc.detail or exc.public_message}"


class MepAuthenticatorMixin(LoggingConfigurable):
    """Put in front of an Authenticator: ``class Auth(MepAuthenticatorMixin, OAuthenticator)``."""

    mep_mapping_file = Unicode(
        "",
        help="mep identity mapping file (a JSON list of mapping documents). Required.",
    ).tag(config=True, allow_config=True)
    mep_min_uid = Integer(
        1000, help="Smallest uid a login may map to (uid 0 is always refused)."
    ).tag(config=True)
    mep_deny_accounts = Set(Unicode(), help="Account names a login may never map to.").tag(
        config=True
    )
    mep_allow_nologin_shell = Bool(
        False, help="Accept accounts whose shell is nologin or false."
    ).tag(config=True)
    mep_mapping_timeout = Float(
        10.0, help="Time limit (seconds) for an external mapping program."
    ).tag(config=True)
    mep_policy_files = List(
        Unicode(),
        help=(
            "mep Casbin policy files (read in order) deciding spawns and profiles. "
            "Empty: no policy is asked, every mapped account may start every profile."
        ),
    ).tag(config=True)
    mep_policy_model = Unicode(
        "", help="mep's Casbin model file; empty: the model shipped with mepcore."
    ).tag(config=True)
    mep_endpoint = Unicode(
        DEFAULT_ENDPOINT, help="The policy's endpoint (Casbin domain) this hub is."
    ).tag(config=True)
    mep_profiles = Dict(
        value_trait=Unicode(),
        help=(
            "Profiles offered by mep_options_form: name (the policy's template:<name>) "
            "to the label shown. Empty: only mep_default_profile, and no form."
        ),
    ).tag(config=True)
    mep_default_profile = Unicode(
        "default", help="The profile of a spawn that names none (no form, the REST API)."
    ).tag(config=True)

    # -- the gates, built once -------------------------------------------------------

    _mep_login_gate: LoginGate | None = None
    _mep_spawn_gate: SpawnGate | None = None

    def _next(self, name: str) -> Any:
        """The next class's method ``name`` (the authenticator this mixin is in front of)."""
        return getattr(super(), name)

    def mep_login_gate(self) -> LoginGate:
        """The mapping file and account checks (loaded at the first call)."""
        gate = self._mep_login_gate
        if gate is None:
            if not self.mep_mapping_file:
                raise ValueError(f"{type(self).__name__}.mep_mapping_file is not set")
            policy = AccountPolicy(
                min_uid=self.mep_min_uid,
                daemon_uid=os.getuid(),
                deny=self.mep_deny_accounts,
                allow_nologin_shell=self.mep_allow_nologin_shell,
            )
            # Unprivileged, /etc/shadow cannot be read: the check is skipped, as in mepd.
            shadow = SystemShadowDatabase() if os.geteuid() == 0 else None
            gate = LoginGate.from_file(
                self.mep_mapping_file,
                policy=policy,
                shadow=shadow,
                timeout=self.mep_mapping_timeout,
            )
            self._mep_login_gate = gate
        return gate

    def mep_spawn_gate(self) -> SpawnGate | None:
        """The policy (loaded at the first call); None when no policy file is set."""
        if not self.mep_policy_files:
            return None
        gate = self._mep_spawn_gate
        if gate is None:
            gate = SpawnGate.from_files(
                self.mep_policy_files,
                model=self.mep_policy_model or None,
                endpoint=self.mep_endpoint,
            )
            self._mep_spawn_gate = gate
        return gate

    def check_allow_config(self) -> None:
        """At hub start: load the mapping file and the policy, so a broken one stops the
        start (with the file and line) instead of refusing every login later."""
        self._next("check_allow_config")()
        self.mep_login_gate()
        if self.mep_spawn_gate() is None:
            self.log.warning(
                "mep: no mep_policy_files: every mapped account may start every profile"
            )

    # -- login -----------------------------------------------------------------------

    async def authenticate(self, handler: Any, data: Any) -> dict[str, Any] | None:
        """The wrapped authenticator's answer, renamed to the mapped, checked account."""
        answer = await maybe_future(self._next("authenticate")(handler, data))
        if answer is None:
            return None
        model: dict[str, Any] = dict(answer) if isinstance(answer, dict) else {"name": answer}
        mapped = await self._mep_resolve(str(model["name"]))
        state = model.get("auth_state")
        model["auth_state"] = {**(state if isinstance(state, dict) else {})}
        model["auth_state"][LOGIN_STATE_KEY] = mapped.login
        model["name"] = mapped.account.name
        return model

    async def _mep_map(self, login: str) -> MappedLogin:
        """``LoginGate.resolve``, off the event loop when a mapping program may run."""
        gate = self.mep_login_gate()
        if gate.mapper.runs_programs:
            return await asyncio.to_thread(gate.resolve, login)
        return gate.resolve(login)

    async def _mep_resolve(self, login: str) -> MappedLogin:
        try:
            mapped = await self._mep_map(login)
        except MepError as exc:
            self.log.warning("mep: login %r refused: %s", login, _admin(exc))
            raise _refusal(_public(exc), exc.reason, _admin(exc)) from exc
        self.log.info(
            "mep: login %r mapped to %s (uid %d)", login, mapped.account.name, mapped.account.uid
        )
        return mapped

    def normalize_username(self, username: str) -> str:
        """Unchanged: after mapping a name is an account name, and those are exact."""
        return username

    def check_allowed(self, username: str, authentication: Any = None) -> bool:
        """A login this mixin mapped is allowed; anything else is up to the authenticator."""
        state = authentication.get("auth_state") if isinstance(authentication, dict) else None
        if isinstance(state, dict) and LOGIN_STATE_KEY in state:
            return True
        return bool(self._next("check_allowed")(username, authentication))

    # -- spawn -----------------------------------------------------------------------

    async def _mep_caller(self, user: Any) -> tuple[Account, IdentitySet | None]:
        """The user's account, checked again, and the login's identities when known."""
        gate = self.mep_login_gate()
        state = await user.get_auth_state()
        login = state.get(LOGIN_STATE_KEY) if isinstance(state, dict) else None
        try:
            if isinstance(login, str):
                mapped = await self._mep_map(login)
                if mapped.account.name != user.name:
                    raise IdentityError(
                        "identity.no_mapping",
                        f"{login!r} now maps to {mapped.account.name}, not {user.name}",
                    )
                return mapped.account, mapped.identities
            return gate.check(user.name), None
        except MepError as exc:
            self.log.warning("mep: %s may not start a server: %s", user.name, _admin(exc))
            raise _refusal(_public(exc), exc.reason, _admin(exc)) from exc

    async def mep_allowed_profiles(self, user: Any) -> list[tuple[str, str]]:
        """The offered profiles (name, label) the policy allows this user, in order."""
        offered = dict(self.mep_profiles) or {self.mep_default_profile: self.mep_default_profile}
        gate = self.mep_spawn_gate()
        if gate is None:
            return list(offered.items())
        account, identities = await self._mep_caller(user)
        allowed = set(gate.allowed_profiles(account, offered, identities=identities))
        return [(name, label) for name, label in offered.items() if name in allowed]

    async def pre_spawn_start(self, user: Any, spawner: Any) -> None:
        """Refuse the spawn unless the account still passes and the policy allows it."""
        await maybe_future(self._next("pre_spawn_start")(user, spawner))
        account, identities = await self._mep_caller(user)
        options = spawner.user_options if isinstance(spawner.user_options, dict) else {}
        profile = options.get("profile") or self.mep_default_profile
        if not isinstance(profile, str) or (self.mep_profiles and profile not in self.mep_profiles):
            message = "the authorization request is not valid (authz.request_invalid)"
            self.log.warning("mep: %s asked for an unknown profile %r", user.name, profile)
            raise _refusal(message, "authz.request_invalid", f"unknown profile {profile!r}")
        gate = self.mep_spawn_gate()
        if gate is None:
            return
        try:
            decision = gate.decide(account, profile, identities=identities)
        except MepError as exc:
            raise _refusal(_public(exc), exc.reason, _admin(exc)) from exc
        if not decision.allowed:
            self.log.warning(
                "mep: %s may not start profile %r: %s", user.name, profile, decision.detail
            )
            raise _refusal(decision.public_message, decision.reason, decision.detail)
        self.log.info("mep: %s starts profile %r: %s", user.name, profile, decision.detail)


async def mep_options_form(spawner: Any) -> str:
    """For ``c.Spawner.options_form``: a choice among the profiles the policy allows.

    Empty (no form: the default profile) when ``mep_profiles`` is not set."""
    authenticator = spawner.authenticator
    if not isinstance(authenticator, MepAuthenticatorMixin):
        raise TypeError("mep_options_form needs an authenticator with MepAuthenticatorMixin")
    if not authenticator.mep_profiles:
        return ""
    profiles = await authenticator.mep_allowed_profiles(spawner.user)
    if not profiles:
        return '<p class="mep-no-profile">The policy allows your account no profile here.</p>'
    options = "".join(
        f'<option value="{html.escape(name)}">{html.escape(label)}</option>'
        for name, label in profiles
    )
    return (
        '<label for="mep-profile">Profile</label>'
        f'<select class="form-control" id="mep-profile" name="profile">{options}</select>'
    )


def mep_options_from_form(formdata: dict[str, list[str]]) -> dict[str, str]:
    """For ``c.Spawner.options_from_form``: ``{"profile": <the choice>}`` (or nothing)."""
    values = formdata.get("profile") or []
    return {"profile": values[0]} if values and isinstance(values[0], str) else {}
