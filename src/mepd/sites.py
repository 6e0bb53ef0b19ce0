"""Each configured endpoint with its files loaded: the ``Site`` the pipeline asks.

``load_sites`` reads every endpoint's mapping, policy and template (with schema and
environment); ``LoadedSite`` answers the admission step's questions with the real
mepcore components. Files never change under a ``LoadedSite``: a reload builds new ones,
and a part that fails to load keeps its previous version in force.

Deliberately not here: decisions of its own (identity, accounts and policy are mepcore's),
file-trust checks of the daemon's files (``mepd check``), anything about processes.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import attrs

from mepcore.authz import Authorizer, AuthzRequest, PolicyLine
from mepcore.config import SiteFiles, VariableLimits, config_key, validate_variables
from mepcore.identity import AccountPolicy, IdentityMapper, check_account
from mepcore.ports import (
    AccountDatabase,
    ShadowDatabase,
    SystemAccountDatabase,
    SystemShadowDatabase,
)
from mepcore.tasks import ResourceLimits
from mepcore.types import Account
from mepd.admission import DecisionView
from mepd.auth import Caller
from mepd.settings import EndpointSettings, Settings

VALIDATED_CACHE_ENTRIES = 1024


@attrs.define(eq=False)
class LoadedSite:
    """An endpoint with its mapping, policy and template loaded (the pipeline's ``Site``).

    The result of validating the same variables again is remembered (validation costs
    ~1 ms, and the schema cannot change under this object)."""

    settings: EndpointSettings
    mapper: IdentityMapper
    authorizer: Authorizer
    files: SiteFiles
    accounts: AccountDatabase
    account_policy: AccountPolicy
    shadow: ShadowDatabase | None = None
    variable_limits: VariableLimits = attrs.field(factory=VariableLimits)
    _validated: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def template_name(self) -> str:
        """The template's name in the policy (``template:<name>``), from the settings;
        ``files.template_name`` is the file's name, which Jinja2 sees."""
        return self.settings.template_name

    @property
    def parent_config(self) -> dict[str, Any]:
        """What the template may read of the endpoint's settings (``_GC.parent_config``,
        as Globus Compute offers its endpoint's config): no paths, nothing secret."""
        allowed = self.settings.allowed_functions
        return {
            "name": self.name,
            "display_name": self.settings.display_name,
            "template_name": self.template_name,
            "allowed_functions": None if allowed is None else list(allowed),
            "high_assurance": False,
        }

    @property
    def allowed_functions(self) -> frozenset[str] | None:
        allowed = self.settings.allowed_functions
        return None if allowed is None else frozenset(allowed)

    @property
    def mapping_blocks(self) -> bool:
        return self.mapper.runs_programs

    @property
    def resource_limits(self) -> ResourceLimits:
        return self.settings.resource_limits

    def map_identity(self, caller: Caller) -> str | None:
        return self.mapper.map(caller.identities).username

    def check_account(self, name: str) -> Account:
        """Looked up anew at every use (no cache: a changed uid is seen at once)."""
        today = int(time.time() // 86400)
        return check_account(
            name, self.accounts, self.account_policy, shadow=self.shadow, today=today
        )

    def decide(
        self, obj: str, action: str, principals: Sequence[str], caller: Caller, account: Account
    ) -> DecisionView:
        request = AuthzRequest(
            self.name,
            obj,
            action,
            tuple(principals),
            caller.mfa,
            caller.auth_age(time.time()),
            account.uid,
        )
        decision = self.authorizer.decide(request)
        return DecisionView(
            allowed=decision.allowed,
            reason=decision.reason,
            lines=tuple(
                f"{line.location} {line}" if isinstance(line, PolicyLine) else line
                for line in decision.lines
            ),
            policy_version=decision.policy_version,
        )

    def validate_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]:
        key = json.dumps(variables, sort_keys=True, separators=(",", ":"))
        hit = self._validated.get(key)
        if hit is None:
            hit = validate_variables(variables, self.files.schema, self.variable_limits)
            if len(self._validated) >= VALIDATED_CACHE_ENTRIES:
                self._validated.pop(next(iter(self._validated)))
            self._validated[key] = hit
        return copy.deepcopy(hit)

    def config_key(self, account: Account, variables: Mapping[str, Any]) -> str:
        return config_key(account.name, self.files.template_digest, variables)


def account_policy(settings: Settings, euid: int) -> AccountPolicy:
    """The account checks of a daemon running as ``euid``.

    As root (the deployment this is built for) the daemon's own uid is refused like uid 0.
    Unprivileged, the daemon can only start user endpoints as itself (single-account mode,
    for trying mep out or a personal server): its own uid is then the one account it
    serves."""
    return AccountPolicy(
        min_uid=settings.min_uid,
        daemon_uid=euid if euid == 0 else None,
        deny=frozenset(settings.deny_accounts),
        only_uid=None if euid == 0 else euid,
        allow_nologin_shell=settings.allow_nologin_shell,
    )


@attrs.frozen
class LoadReport:
    sites: dict[str, LoadedSite]
    problems: tuple[str, ...]


_PARTS = ("mapping", "policy", "template")


def _loaders(ep: EndpointSettings) -> dict[str, Callable[[], Any]]:
    return {
        "mapping": partial(IdentityMapper.from_file, ep.mapping),
        "policy": partial(Authorizer.from_files, ep.policy_model, ep.policy),
        "template": partial(SiteFiles.from_files, ep.template, ep.schema, ep.environment),
    }


def _previous_parts(old: LoadedSite | None) -> dict[str, Any]:
    if old is None:
        return dict.fromkeys(_PARTS)
    return {"mapping": old.mapper, "policy": old.authorizer, "template": old.files}


def _load_parts(
    ep: EndpointSettings, old: LoadedSite | None, problems: list[str]
) -> dict[str, Any]:
    """Each part of one endpoint, or its previous version when it fails to load."""
    parts: dict[str, Any] = {}
    olds = _previous_parts(old)
    for part, loader in _loaders(ep).items():
        try:
            parts[part] = loader()
        except Exception as exc:  # any failure to load keeps the old version in force
            keep = olds[part]
            problems.append(
                f"endpoint {ep.name}: {part}: {exc}"
                + ("; the previous version stays in force" if keep is not None else "")
            )
            if keep is not None:
                parts[part] = keep
    return parts


def load_sites(settings: Settings, previous: Mapping[str, LoadedSite] | None = None) -> LoadReport:
    """Load every endpoint's files. With ``previous`` (a reload), a part that fails keeps
    its previous version; without it (a start), an endpoint with a failed part is left
    out and the problem reported."""
    accounts = SystemAccountDatabase()
    # Unprivileged, /etc/shadow cannot be read: the check is skipped, not failed.
    shadow = SystemShadowDatabase() if os.geteuid() == 0 else None
    policy = account_policy(settings, os.geteuid())
    problems: list[str] = []
    sites: dict[str, LoadedSite] = {}
    for ep in settings.endpoints:
        old = (previous or {}).get(ep.name)
        parts = _load_parts(ep, old, problems)
        if len(parts) == len(_PARTS):
            sites[ep.name] = LoadedSite(
                ep,
                parts["mapping"],
                parts["policy"],
                parts["template"],
                accounts,
                policy,
                shadow,
            )
        elif old is not None:
            sites[ep.name] = old
    return LoadReport(sites, tuple(problems))
