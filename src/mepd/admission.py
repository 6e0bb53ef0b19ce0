"""The decision before any work: map the caller to an account, ask the policy, validate
the variables — and write each decision to the audit log before it takes effect.

``Admission`` talks to one configured endpoint through the ``Site`` port (``mepd.daemon``
adapts the real mepcore components to it; the tests use fakes). Every refusal raises a
``MepError`` with its reason code; the audit log gets the detail.

Every question the daemon asks the policy is one of ``REQUEST_KINDS``, asked by the
submit here and by status, introspect and stop in ``mepd.pipeline``: docs/authorization.md
lists them, and tests/test_shipped_policy.py checks the daemon asks nothing else and the
shipped policies answer each as documented. ``read_result`` is not among them on
purpose: a task is shown only to the identity that submitted it, decided in code
(``mepd.delivery``), never by policy.

Deliberately not here: request shapes (``mepd.shapes``), starting user endpoints and
dispatching (``mepd.pipeline``), results (``mepd.delivery``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs

from mepcore.authz import principals_of
from mepcore.errors import REASONS, AuthzError, IdentityError, TaskError, Violation
from mepcore.tasks import ResourceLimits, ResourceSpecification
from mepcore.types import Account, Identity
from mepd.audit import AuditSink
from mepd.auth import Caller
from mepd.metrics import Metrics
from mepd.shapes import RequestError
from mepd.spec import EndpointSpec


@attrs.frozen
class DecisionView:
    """What the daemon needs of an authorization decision."""

    allowed: bool
    reason: str
    lines: tuple[str, ...] = ()
    policy_version: str = ""


class Site(Protocol):
    """One configured endpoint with its loaded files (mapping, policy, template…)."""

    @property
    def name(self) -> str: ...

    @property
    def template_name(self) -> str:
        """The template's name in the policy (``template:<name>``): the endpoint's
        ``template_name`` setting, ``default`` unless the administrator names it."""
        ...

    @property
    def allowed_functions(self) -> frozenset[str] | None: ...

    @property
    def mapping_blocks(self) -> bool:
        """True when mapping may run a program (then it runs off the event loop)."""
        ...

    def map_identity(self, caller: Caller) -> str | None: ...

    def check_account(self, name: str) -> Account: ...

    def decide(
        self, obj: str, action: str, principals: Sequence[str], caller: Caller, account: Account
    ) -> DecisionView: ...

    def validate_variables(self, variables: Mapping[str, Any]) -> dict[str, Any]: ...

    def config_key(self, account: Account, variables: Mapping[str, Any]) -> str: ...

    @property
    def resource_limits(self) -> ResourceLimits:
        """Caps on what one MPI task of an account may ask for (the endpoint's
        ``resource_limits`` setting)."""
        ...


Check = tuple[str, str]


def check_resources(
    site: Site, account: Account, specs: Sequence[ResourceSpecification | None]
) -> None:
    """Refuse the submit (``task.resources_not_allowed``) if any task asks for more nodes
    or ranks than the endpoint's ``resource_limits`` allow this account."""
    limits = site.resource_limits
    for index, spec in enumerate(specs):
        if spec is None:
            continue
        try:
            limits.check(spec, account.name)
        except TaskError as exc:
            where = f"$.tasks[{index}].resource_specification"
            # The caller's own request, measured against their own caps: safe to show.
            raise RequestError(
                exc.reason, exc.detail, violations=[Violation(where, exc.detail)]
            ) from None


@attrs.frozen
class RequestKind:
    """One kind of question the daemon asks the policy: an object (with ``{account}``,
    ``{template_name}`` or ``{function_id}`` filled in per request) and an action."""

    name: str
    obj: str
    action: str

    def check(self, **values: str) -> Check:
        return (self.obj.format(**values), self.action)


MAP_IDENTITY = RequestKind("submit: map the caller", "user:{account}", "map_identity")
START_ENDPOINT = RequestKind("submit: the template", "template:{template_name}", "start_endpoint")
SUBMIT_TASK = RequestKind("submit: each function", "function:{function_id}", "submit_task")
READ_STATUS = RequestKind("status and introspect", "user:{account}", "read_status")
STOP_OWN = RequestKind("stop one's own user endpoints", "user:{account}", "stop_endpoint")
STOP_OTHER = RequestKind("stop another account's user endpoints", "endpoint", "admin")

# Every question mepd asks the policy, in no particular order.
REQUEST_KINDS: tuple[RequestKind, ...] = (
    MAP_IDENTITY,
    START_ENDPOINT,
    SUBMIT_TASK,
    READ_STATUS,
    STOP_OWN,
    STOP_OTHER,
)


@attrs.frozen
class Admitted:
    """A submit the policy allowed: the account to run as and the user endpoint it needs."""

    site: Site
    account: Account
    spec: EndpointSpec
    config_key: str


def submit_checks(account: Account, site: Site, function_ids: Iterable[str]) -> list[Check]:
    """The (object, action) pairs a submit asks the policy about, in order."""
    return [
        MAP_IDENTITY.check(account=account.name),
        START_ENDPOINT.check(template_name=site.template_name),
        *(SUBMIT_TASK.check(function_id=fid) for fid in function_ids),
    ]


# Specs and config keys remembered (``Admission._spec``).
SPEC_CACHE_ENTRIES = 1024

# Audit records held back to be written together (``Admission.admit_submit``).
Events = list[tuple[str, Mapping[str, Any]]]


@attrs.define
class Admission:
    """Map → authorize → validate, with every decision audited first."""

    audit: AuditSink
    metrics: Metrics
    _specs: dict[Any, tuple[Site, Identity, EndpointSpec, str]] = attrs.field(
        factory=dict, init=False
    )

    def _note(self, events: Events | None, event: str, **fields: Any) -> None:
        """Record ``event`` now, or add it to ``events``, which the caller writes before
        anything the decisions allow happens."""
        if events is None:
            self.audit.record(event, **fields)
        else:
            events.append((event, fields))

    async def account_of(self, site: Site, caller: Caller, events: Events | None = None) -> Account:
        """The caller's local account at ``site``, checked; refusals are audited."""
        audit_ids = [i.id for i in caller.identities]
        try:
            if site.mapping_blocks:
                # An external mapping program may run for seconds: not on the loop.
                name = await asyncio.to_thread(site.map_identity, caller)
            else:
                name = site.map_identity(caller)
            if name is None:
                raise IdentityError("identity.no_mapping", "no mapping rule matched")
            account = site.check_account(name)
        except IdentityError as exc:
            self._note(
                events,
                "identity.mapping_failed",
                endpoint=site.name,
                identities=audit_ids,
                issuer=caller.issuer,
                reason=exc.admin_reason,  # the specific code; the caller sees exc.reason
                public_reason=exc.reason,
                detail=exc.detail,
            )
            raise
        self._note(
            events,
            "identity.mapping_resolved",
            endpoint=site.name,
            identities=audit_ids,
            issuer=caller.issuer,
            account=account.name,
            uid=account.uid,
        )
        return account

    def authorize(
        self,
        site: Site,
        caller: Caller,
        account: Account,
        checks: Iterable[Check],
        events: Events | None = None,
    ) -> None:
        """Ask the policy about each check; the first denial is raised."""
        principals = principals_of(caller.identities, account)
        for obj, action in checks:
            decision = site.decide(obj, action, principals, caller, account)
            self.metrics.decisions.inc(action=action, allowed=str(decision.allowed).lower())
            self._note(
                events,
                "authz.decided",
                endpoint=site.name,
                identity=caller.identities.primary.id,
                issuer=caller.issuer,
                account=account.name,
                object=obj,
                action=action,
                allowed=decision.allowed,
                reason=decision.reason,
                lines=list(decision.lines),
                policy_version=decision.policy_version,
            )
            if not decision.allowed:
                raise AuthzError(denial_reason(decision.reason), f"{action} on {obj} denied")

    def check_allowed_functions(
        self,
        site: Site,
        account: Account,
        function_ids: Sequence[str],
        events: Events | None = None,
    ) -> None:
        allowed = site.allowed_functions
        refused = [] if allowed is None else [f for f in function_ids if f not in allowed]
        if refused:
            self._note(
                events,
                "task.function_refused",
                endpoint=site.name,
                account=account.name,
                function_ids=refused,
            )
            raise TaskError("task.function_not_allowed", f"not allowed: {refused}")

    async def admit_submit(
        self,
        site: Site,
        caller: Caller,
        function_ids: Sequence[str],
        variables: Mapping[str, Any],
        user_runtime: Mapping[str, Any],
    ) -> Admitted:
        """The whole decision of a submit, or the refusal that ends it. Its audit
        records (mapping, each policy decision, a refusal) are written with one write,
        before this returns or raises: before anything they allow happens, and a log
        that cannot take them fails the submit (``AuditUnavailable``)."""
        events: Events = []
        try:
            account = await self.account_of(site, caller, events)
            checks = submit_checks(account, site, function_ids)
            self.authorize(site, caller, account, checks, events)
            self.check_allowed_functions(site, account, function_ids, events)
        finally:
            self.audit.record_many(events)
        spec, key = self._spec(site, account, caller, variables, user_runtime)
        return Admitted(site, account, spec, key)

    def _spec(
        self,
        site: Site,
        account: Account,
        caller: Caller,
        variables: Mapping[str, Any],
        user_runtime: Mapping[str, Any],
    ) -> tuple[EndpointSpec, str]:
        """The spec and config key of a submit: validated, built and digested once for
        the same site and identity (the very objects: a reload makes new sites, and a
        caller's verified token keeps its identity object), account (every field),
        variables and runtime; those determine them."""
        identity = caller.identities.primary
        try:
            seen: Any = (
                account,
                id(identity),
                json.dumps(variables, sort_keys=True),
                json.dumps(user_runtime, sort_keys=True),
            )
        except (TypeError, ValueError):  # not plain JSON: validation says why
            seen = None
        hit = self._specs.get(seen) if seen is not None else None
        if hit is not None and hit[0] is site and hit[1] is identity:
            return hit[2], hit[3]
        valid = site.validate_variables(variables)
        spec = EndpointSpec(site.name, account.name, valid, user_runtime, identity)
        key = site.config_key(account, valid)
        if seen is not None:
            if len(self._specs) >= SPEC_CACHE_ENTRIES:
                del self._specs[next(iter(self._specs))]
            # The identity is held with its entry: its id is not reused meanwhile.
            self._specs[seen] = (site, identity, spec, key)
        return spec, key

    async def admit_again(self, site: Site, spec: EndpointSpec) -> Admitted:
        """A stored spec, checked again (after a restart): the account may have changed."""
        account = site.check_account(spec.account)
        valid = site.validate_variables(spec.variables)
        return Admitted(site, account, spec, site.config_key(account, valid))


def denial_reason(reason: str) -> str:
    """The reason code a caller sees for a denial: an ``authz.*`` code, never ``allowed``."""
    if reason not in REASONS or not reason.startswith("authz.") or reason == "authz.allowed":
        return "authz.denied"
    return reason
