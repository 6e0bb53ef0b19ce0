"""The in-process adapter: runs cases directly against the mepcore components.

This is the only module of the runner that imports ``mepcore`` (and, for process and
task ops, ``mepd``). Each op builds the component from the case's ``given`` with the
fakes of ``mepcore.testing`` (accounts in memory, a clock that moves only when told),
runs the input and turns the outcome into an ``Observation``: a ``MepError`` becomes an
error with its reason code (the public one) and violation paths, plus
``details.admin_reason`` when the specific code is one callers do not see.

``broken=<variant>`` builds a deliberately wrong deployment, to show that the suite
catches it (tests/test_conformance.py); it exists only for that demonstration:

- ``prefix-match``: every mapping expression also accepts any suffix (as ``re.match``
  instead of ``re.fullmatch`` would);
- ``permissive-authz``: the authorizer allows every request;
- ``no-account-check``: the mapped name is looked up but none of the account safety
  checks (uid 0, min_uid, daemon uid, deny list, portable name) is applied.

Components that have not landed in this checkout are reported per op as a skip with
the reason (the import error), never as a pass.
"""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mepconf.adapters import AdapterError, Observation, Skip
from mepconf.suite import Case

BROKEN_VARIANTS = ("prefix-match", "permissive-authz", "no-account-check")

Handler = Callable[[Case], Observation]


def create(options: Mapping[str, str]) -> InProcessAdapter:
    broken = options.get("broken") or None
    if broken is not None and broken not in BROKEN_VARIANTS:
        raise AdapterError(f"unknown broken variant {broken!r} (known: {BROKEN_VARIANTS})")
    unknown = set(options) - {"broken"}
    if unknown:
        raise AdapterError(f"the inprocess adapter takes no options {sorted(unknown)}")
    return InProcessAdapter(broken=broken)


def _error_observation(exc: Exception) -> Observation:
    from mepcore.errors import MepError

    if not isinstance(exc, MepError):
        raise exc
    details: dict[str, Any] = {}
    if exc.admin_reason != exc.reason:
        # The specific code of an admin-only refusal (``identity.account_root`` behind
        # ``identity.account_refused``): a caller never sees it, this adapter can.
        details["admin_reason"] = exc.admin_reason
    return Observation.failed(
        exc.reason,
        exc.public_message,
        tuple(v.path for v in exc.violations),
        details,
    )


@attrs.define
class InProcessAdapter:
    broken: str | None = None
    name: str = "inprocess"

    def _handlers(self) -> dict[str, Handler]:
        return {
            "identity.map": self._identity_map,
            "identity.check_account": self._identity_check_account,
            "identity.resolve": self._identity_resolve,
            "authz.decide": self._authz_decide,
            "config.validate": self._config_validate,
            "config.render": self._config_render,
            "config.key": self._config_key,
            "task.run": self._task_run,
            "task.batch": self._task_batch,
        }

    def ops(self) -> frozenset[str]:
        return frozenset(self._handlers())

    def properties(self) -> frozenset[str]:
        props = {"tasks", "walltime", "worker_crash"}
        if shutil.which("sh", path="/bin:/usr/bin"):
            props.add("external_programs")
        if os.geteuid() == 0:
            props.add("root")
        return frozenset(props)

    def execute(self, case: Case) -> Observation:
        handler = self._handlers()[case.op]
        from mepcore.errors import MepError

        try:
            return handler(case)
        except MepError as exc:
            return _error_observation(exc)

    def close(self) -> None:
        return None

    # -- identity ------------------------------------------------------------------

    def _mapper(self, given: Mapping[str, Any]) -> Any:
        identity = _component("mepcore.identity")
        docs = given["mapping"]
        if self.broken == "prefix-match":
            docs = _prefix_matching(docs)
        kwargs: dict[str, Any] = {}
        if "mapper_timeout" in given:
            kwargs["timeout"] = float(given["mapper_timeout"])
        if "mapper_max_output" in given:
            kwargs["max_output"] = int(given["mapper_max_output"])
        return identity.IdentityMapper.from_documents(docs, **kwargs)

    def _map(self, case: Case) -> Any:
        from mepcore.types import IdentitySet

        mapper = self._mapper(case.given)
        return mapper.map(IdentitySet.from_json(case.input))

    def _identity_map(self, case: Case) -> Observation:
        result = self._map(case)
        if result.username is None:
            return Observation.failed("identity.no_mapping", "no rule matched")
        return Observation.ok(result.to_dict())

    def _check(self, name: str, given: Mapping[str, Any]) -> Any:
        identity = _component("mepcore.identity")
        from mepcore.testing import FakeAccountDatabase

        db = FakeAccountDatabase()
        for acc in given.get("accounts", []):
            db.add(
                acc["name"],
                acc["uid"],
                acc.get("gid"),
                groups=[(g[0], g[1]) for g in acc.get("groups", [])],
                home=acc.get("home"),
                shell=acc.get("shell", "/bin/bash"),
                pw_name=acc.get("pw_name"),
            )
        raw = given.get("account_policy", {})
        policy = identity.AccountPolicy(
            min_uid=raw.get("min_uid", 1000),
            daemon_uid=raw.get("daemon_uid"),
            deny=raw.get("deny", ()),
        )
        if self.broken == "no-account-check":
            account = db.by_name(name)
            if account is None:
                from mepcore.errors import IdentityError

                raise IdentityError("identity.account_missing", "no such account")
            return account
        return identity.check_account(name, db, policy)

    def _identity_check_account(self, case: Case) -> Observation:
        return Observation.ok(self._check(case.input["name"], case.given).to_dict())

    def _identity_resolve(self, case: Case) -> Observation:
        result = self._map(case)
        if result.username is None:
            return Observation.failed("identity.no_mapping", "no rule matched")
        account = self._check(result.username, case.given)
        return Observation.ok({**result.to_dict(), "account": account.to_dict()})

    # -- authorization -------------------------------------------------------------

    def _authz_decide(self, case: Case) -> Observation:
        authz = _component("mepcore.authz")
        from mepcore.testing import FakeClock

        given = case.given
        clock = FakeClock(wall=_epoch(given.get("clock", "2024-01-01T12:00:00Z")))
        authorizer = authz.Authorizer.from_text(
            model=given["model"], policy=given.get("policy", ""), clock=clock
        )
        raw = case.input
        request = authz.AuthzRequest(
            endpoint=raw["endpoint"],
            obj=raw["obj"],
            action=raw["action"],
            principals=tuple(raw.get("principals", ())),
            mfa=raw.get("mfa", False),
            auth_age=raw.get("auth_age"),
            uid=raw.get("uid"),
        )
        decision = authorizer.decide(request)
        if self.broken == "permissive-authz":
            decision = attrs.evolve(decision, allowed=True, reason="authz.allowed")
        return Observation.ok(decision.to_dict())

    # -- configuration ---------------------------------------------------------------

    def _config_validate(self, case: Case) -> Observation:
        config = _component("mepcore.config")
        limits = config.VariableLimits(**case.given.get("variable_limits", {}))
        variables = config.validate_variables(
            case.input.get("variables"), case.given.get("schema"), limits
        )
        return Observation.ok({"variables": variables})

    def _config_render(self, case: Case) -> Observation:
        config = _component("mepcore.config")
        from mepcore.types import Account, Identity

        given, raw = case.given, case.input
        variables = config.validate_variables(
            raw.get("variables"),
            given.get("schema"),
            config.VariableLimits(**given.get("variable_limits", {})),
        )
        acc = given.get("account", _DEFAULT_ACCOUNT)
        account = Account(
            name=acc["name"],
            uid=acc["uid"],
            gid=acc.get("gid", acc["uid"]),
            home=acc.get("home", f"/home/{acc['name']}"),
            shell=acc.get("shell", "/bin/bash"),
            group_ids=tuple(g[1] for g in acc.get("groups", [])),
            group_names=tuple(g[0] for g in acc.get("groups", [])),
        )
        ident = given.get("identity")
        mapped = config.MappedIdentity(
            account, Identity.from_mapping(ident) if ident is not None else None
        )
        endpoint_config = config.render_endpoint_config(
            given["template"],
            variables,
            mapped=mapped,
            user_runtime=raw.get("user_runtime"),
            includes=given.get("includes"),
            limits=config.RenderLimits(**given.get("render_limits", {})),
        )
        return Observation.ok({"config": endpoint_config.to_dict()})

    def _config_key(self, case: Case) -> Observation:
        config = _component("mepcore.config")

        def key(side: Mapping[str, Any]) -> str:
            digest = config.template_digest(
                config.DEFAULT_TEMPLATE_NAME, side["template"], side.get("includes", {})
            )
            return str(config.config_key(side["account"], digest, side["variables"]))

        return Observation.ok({"equal": key(case.input["a"]) == key(case.input["b"])})

    # -- tasks -----------------------------------------------------------------------

    def _task_run(self, case: Case) -> Observation:
        outcome = self._run_calls(case, [case.input])[0]
        if "error" in outcome:
            details = {k: outcome[k] for k in ("type_name", "message", "traceback")}
            return Observation.failed(outcome["error"], outcome["message"], (), details)
        return Observation.ok({"value": outcome["value"]})

    def _task_batch(self, case: Case) -> Observation:
        outcomes = self._run_calls(case, case.input["calls"])
        return Observation.ok({"outcomes": outcomes})

    def _run_calls(self, case: Case, calls: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Run calls on a fresh process-pool executor as this process's own user."""
        tasks = _component("mepcore.tasks")
        given = case.given
        functions: dict[str, tuple[str, bytes]] = {}
        for call in calls:
            spec = call["function"]
            if spec["name"] not in functions:
                functions[spec["name"]] = tasks.pack_function(_load_function(spec))
        allowed = None
        if "allowed_functions" in given:
            allowed = [functions[n][0] for n in given["allowed_functions"] if n in functions]
        limit_kwargs = {}
        if "max_result_bytes" in given:
            limit_kwargs["max_result_bytes"] = int(given["max_result_bytes"])
        executor = tasks.Executor.from_engine_config(
            given.get("engine", {"type": "ProcessPoolEngine", "max_workers": 1}),
            limits=tasks.ExecutorLimits(**limit_kwargs),
            allowed_functions=allowed,
        )
        executor.start()
        try:
            for function_id, body in functions.values():
                executor.register_function(function_id, body)
            envelopes = [
                tasks.TaskEnvelope(
                    task_id=f"{case.id}#{i}",
                    function_id=functions[call["function"]["name"]][0],
                    payload=tasks.pack_args(tuple(call.get("args", ())), call.get("kwargs", {})),
                    walltime=call.get("walltime"),
                )
                for i, call in enumerate(calls)
            ]
            futures = executor.submit_many(envelopes)
            results = [f.result(timeout=_TASK_DEADLINE) for f in futures]
        finally:
            executor.shutdown()
        out: list[dict[str, Any]] = []
        for result in results:
            if result.ok:
                out.append({"value": tasks.unpack_value(result.payload)})
            else:
                err = result.error
                out.append(
                    {
                        "error": result.reason,
                        "type_name": err.type_name if err else "",
                        "message": err.message if err else "",
                        "traceback": err.traceback if err else "",
                    }
                )
        return out


# A bound on any one task of a case, so a broken engine cannot hang the run.
_TASK_DEADLINE = 120.0


def _load_function(spec: Mapping[str, Any]) -> Callable[..., Any]:
    """The function a case names, built from its source text (a suite fixture).

    The namespace's module name is not importable, so dill sends the function by value.
    """
    namespace: dict[str, Any] = {"__name__": "mepconf_case_function"}
    exec(compile(spec["source"], f"<function {spec['name']}>", "exec"), namespace)  # noqa: S102
    function = namespace.get(spec["name"])
    if not callable(function):
        raise AdapterError(f"the source of {spec['name']!r} defines no such function")
    built: Callable[..., Any] = function
    return built


_DEFAULT_ACCOUNT: Mapping[str, Any] = {
    "name": "alice",
    "uid": 1001,
    "gid": 1001,
    "home": "/home/alice",
    "shell": "/bin/bash",
    "groups": [["alice", 1001], ["science", 2001]],
}


def _epoch(text: str) -> float:
    import datetime

    stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        raise AdapterError(f"clock {text!r} needs a time zone (use Z for UTC)")
    return stamp.timestamp()


def _component(module: str) -> Any:
    """Import a mepcore component, or skip the case when it has not landed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(f"{module} is not available in this deployment: {exc}") from exc


def _prefix_matching(docs: Any) -> Any:
    """The broken ``prefix-match`` variant: every expression also matches any suffix
    (rewritten in Python's syntax, which the document then opts in to)."""
    out = []
    for doc in docs if isinstance(docs, list) else [docs]:
        syntax = doc.get("mep_match_syntax", "gcs") if isinstance(doc, dict) else None
        if syntax in ("gcs", "python") and isinstance(doc.get("mappings"), list):
            python = syntax == "python"
            rules = []
            for rule in doc["mappings"]:
                if isinstance(rule, dict) and isinstance(rule.get("match"), str):
                    match = _as_python(rule["match"], rule.get("literal") is True, python)
                    if match is None:  # an invalid expression stays invalid
                        break
                    rule = {**rule, "match": f"(?:{match})(?s:.*)"}
                    if rule.get("literal") is True:
                        rule["literal"] = False
                rules.append(rule)
            else:
                doc = {**doc, "mappings": rules, "mep_match_syntax": "python"}
        out.append(doc)
    return out


def _as_python(match: str, literal: bool, python: bool) -> str | None:
    """A match in Python's syntax, or None when it does not translate (left as it is)."""
    import re

    from mepcore.identity.dialect import MatchSyntaxError, translate_gcs

    if literal:
        return None if "\\" in match and not python else re.escape(match)
    if python:
        return match
    try:
        return translate_gcs(match)
    except MatchSyntaxError:
        return None
