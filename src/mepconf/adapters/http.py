"""The HTTP adapter: drives a running mepd (or anything serving its API) over HTTP.

A *deployment profile* (YAML or JSON, validated by ``PROFILE_SCHEMA``; documented in
conformance/README.md) says where the daemon is, which endpoint the cases use, how to
get a token for each test identity (a literal token or a command printing one, such
as ``mepd token issue``), which local account each identity maps to, which user
endpoint variables to send, and which deployment properties the site provides.

API cases send real requests and compare the status and reason code; task cases
register functions (serialized here with dill, in the ``dill.v1`` payload format the
API documents: the runner is a client) and wait for their results; ``uep.probe`` runs
a probe function inside the caller's user endpoint and relates what it reports to the
mapped account (``"uid": "account"`` when the uids are the account's).

This adapter never imports mepcore or mepd: it checks any implementation of the API.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import io
import json
import os
import pwd
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import dill
import httpx
import jsonschema
import yaml

from mepconf.adapters import AdapterError, Observation, Skip
from mepconf.suite import Case

PAYLOAD_TAG = b"dill.v1\n"
PICKLE_PROTOCOL = 5
DEFAULT_TIMEOUT = 120.0
# Environment keys every user endpoint may have (DESIGN.md §3.3 allowlist), plus the
# profile's ``environment_keys`` (the site's user_environment.yaml).
BASE_ENVIRONMENT = frozenset({"HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG", "TZ"})

PROFILE_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["endpoint", "identities"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://"},
        "endpoint": {"type": "string", "minLength": 1},
        "timeout": {"type": "number", "exclusiveMinimum": 0},
        "verify_tls": {"type": ["boolean", "string"]},
        "identities": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "token": {"type": "string", "minLength": 1},
                    "token_command": {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string"},
                    },
                    "account": {"type": "string"},
                },
                "oneOf": [{"required": ["token"]}, {"required": ["token_command"]}],
            },
        },
        "variables": {"type": "object", "additionalProperties": {"type": "object"}},
        "environment_keys": {"type": "array", "items": {"type": "string"}},
        "properties": {"type": "array", "items": {"type": "string"}},
        "max_body_bytes": {"type": "integer", "minimum": 1},
        "restart_command": {"type": "array", "minItems": 1, "items": {"type": "string"}},
    },
}

OPS = frozenset(
    {
        "api.request",
        "api.register_function",
        "task.run",
        "task.batch",
        "uep.probe",
        "uep.count",
        "durability.restart",
    }
)


def load_profile(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise AdapterError(f"{path}: not valid YAML/JSON: {exc}") from exc
    try:
        jsonschema.validate(data, PROFILE_SCHEMA)
    except jsonschema.ValidationError as exc:
        where = "$" + "".join(f"[{p!r}]" for p in exc.absolute_path)
        raise AdapterError(f"{path}: {where}: {exc.message}") from exc
    assert isinstance(data, dict)
    return data


def create(options: Mapping[str, str]) -> HttpAdapter:
    unknown = set(options) - {"url", "profile"}
    if unknown:
        raise AdapterError(f"the http adapter takes no options {sorted(unknown)}")
    if "profile" not in options:
        raise AdapterError("the http adapter needs --profile FILE")
    profile = load_profile(Path(options["profile"]))
    url = options.get("url") or profile.get("url")
    if not url:
        raise AdapterError("no URL: pass --url or set url in the profile")
    return HttpAdapter(url=url.rstrip("/"), profile=profile)


def pack(value: Any) -> bytes:
    """A ``dill.v1`` payload: the tag line, then dill bytes (pickle protocol 5)."""
    buffer = io.BytesIO()
    buffer.write(PAYLOAD_TAG)
    dill.dump(value, buffer, protocol=PICKLE_PROTOCOL)
    return buffer.getvalue()


def unpack(payload: bytes) -> Any:
    if not payload.startswith(PAYLOAD_TAG):
        raise AdapterError(f"a result payload with an unknown tag: {payload[:20]!r}")
    # Results of the runner's own tasks, computed by the fixed suite functions.
    return dill.loads(payload[len(PAYLOAD_TAG) :])  # noqa: S301


def load_function(spec: Mapping[str, Any]) -> Callable[..., Any]:
    """Build a suite function from its source; its module is not importable, so dill
    sends it by value."""
    namespace: dict[str, Any] = {"__name__": "mepconf_case_function"}
    exec(compile(spec["source"], f"<function {spec['name']}>", "exec"), namespace)  # noqa: S102
    function = namespace.get(spec["name"])
    if not callable(function):
        raise AdapterError(f"the source of {spec['name']!r} defines no such function")
    built: Callable[..., Any] = function
    return built


@attrs.define
class HttpAdapter:
    url: str
    profile: Mapping[str, Any]
    name: str = "http"
    _client: httpx.Client | None = None
    _tokens: dict[str, str] = attrs.field(factory=dict)
    _functions: dict[tuple[str, str], str] = attrs.field(factory=dict)

    # -- the adapter protocol --------------------------------------------------------

    def ops(self) -> frozenset[str]:
        return OPS

    def properties(self) -> frozenset[str]:
        return frozenset({"http", *self.profile.get("properties", [])})

    def execute(self, case: Case) -> Observation:
        handler: Callable[[Case], Observation] = {
            "api.request": self._api_request,
            "api.register_function": self._register_twice,
            "task.run": self._task_run,
            "task.batch": self._task_batch,
            "uep.probe": self._uep_probe,
            "uep.count": self._uep_count,
            "durability.restart": self._restart,
        }[case.op]
        try:
            return handler(case)
        except httpx.HTTPError as exc:
            raise AdapterError(f"HTTP: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- plumbing --------------------------------------------------------------------

    @property
    def timeout(self) -> float:
        return float(self.profile.get("timeout", DEFAULT_TIMEOUT))

    @property
    def endpoint(self) -> str:
        return str(self.profile["endpoint"])

    def client(self) -> httpx.Client:
        if self._client is None:
            verify = self.profile.get("verify_tls", True)
            self._client = httpx.Client(base_url=self.url, timeout=self.timeout, verify=verify)
        return self._client

    def token(self, who: str) -> str:
        if who in self._tokens:
            return self._tokens[who]
        spec = self.profile["identities"].get(who)
        if spec is None:
            raise Skip(f"the profile defines no identity {who!r}")
        if "token" in spec:
            token = str(spec["token"])
        else:
            try:
                done = subprocess.run(
                    spec["token_command"],
                    capture_output=True,
                    text=True,
                    timeout=self.timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise AdapterError(f"token command for {who!r} failed: {exc}") from exc
            if done.returncode != 0:
                raise AdapterError(
                    f"token command for {who!r} exited {done.returncode}: {done.stderr.strip()}"
                )
            token = done.stdout.strip()
        self._tokens[who] = token
        return token

    def headers(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.token(who)}"}

    def variables(self, name: str) -> dict[str, Any]:
        sets = self.profile.get("variables", {})
        if name not in sets:
            if name == "valid":
                return {}
            raise Skip(f"the profile defines no variable set {name!r}")
        return dict(sets[name])

    def account(self, who: str) -> pwd.struct_passwd:
        spec = self.profile["identities"].get(who) or {}
        name = spec.get("account")
        if not name:
            raise Skip(f"the profile does not say which account {who!r} maps to")
        try:
            return pwd.getpwnam(name)
        except KeyError as exc:
            raise Skip(f"account {name!r} is not known on the machine running the suite") from exc

    def register(self, who: str, spec: Mapping[str, Any]) -> str:
        key = (who, spec["name"])
        if key not in self._functions:
            payload = pack(load_function(spec))
            answer = self.call(
                who,
                "POST",
                "/v1/functions",
                {"function": base64.b64encode(payload).decode(), "name": spec["name"]},
            )
            self._functions[key] = str(answer["function_id"])
        return self._functions[key]

    def call(self, who: str | None, method: str, path: str, body: Any = None) -> Any:
        response = self.client().request(method, path, json=body, headers=self.headers(who))
        if response.status_code >= 400:
            raise _ApiFailure(response.status_code, _reason_of(response), response.text[:300])
        return response.json()

    def submit(
        self, who: str, variables: Mapping[str, Any], calls: Sequence[Mapping[str, Any]]
    ) -> list[str]:
        tasks = []
        for call in calls:
            item: dict[str, Any] = {
                "function_id": self.register(who, call["function"]),
                "args": base64.b64encode(
                    pack((tuple(call.get("args", ())), dict(call.get("kwargs", {}))))
                ).decode(),
            }
            if call.get("walltime") is not None:
                item["walltime"] = call["walltime"]
            tasks.append(item)
        answer = self.call(
            who,
            "POST",
            f"/v1/endpoints/{self.endpoint}/submit",
            {"user_endpoint_config": dict(variables), "tasks": tasks},
        )
        return [str(t) for t in answer["task_ids"]]

    def wait(self, who: str, task_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Every task's final view, waiting with a deadline."""
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + self.timeout
        while len(done) < len(task_ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [t for t in task_ids if t not in done]
                raise AdapterError(f"tasks not finished within {self.timeout:g} s: {missing[:5]}")
            pending = [t for t in task_ids if t not in done]
            answer = self.call(
                who,
                "POST",
                "/v1/tasks/wait",
                {"task_ids": pending, "timeout": min(10.0, remaining)},
            )
            for view in answer.get("tasks", []):
                done[view["task_id"]] = view
            if answer.get("unknown"):
                raise AdapterError(f"the daemon does not know tasks {answer['unknown'][:5]}")
        return done

    def run_calls(self, case: Case, calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        given = case.given
        for key in ("allowed_functions", "max_result_bytes", "engine"):
            if key in given:
                raise Skip(
                    f"{key} is fixed by the deployment's configuration; this case sets its own"
                )
        who = str(case.input.get("as", "alice")) if isinstance(case.input, dict) else "alice"
        variables = self.variables(str(case.input.get("variables", "valid")))
        try:
            ids = self.submit(who, variables, calls)
        except _ApiFailure as exc:
            raise AdapterError(f"submit refused: {exc}") from exc
        views = self.wait(who, ids)
        return [_outcome(views[t]) for t in ids]

    # -- ops -------------------------------------------------------------------------

    def _task_run(self, case: Case) -> Observation:
        outcome = self.run_calls(case, [case.input])[0]
        if "error" in outcome:
            details = {k: outcome.get(k) for k in ("type_name", "message", "traceback")}
            return Observation.failed(outcome["error"], str(outcome.get("message")), (), details)
        return Observation.ok({"value": outcome["value"]})

    def _task_batch(self, case: Case) -> Observation:
        return Observation.ok({"outcomes": self.run_calls(case, case.input["calls"])})

    def _register_twice(self, case: Case) -> Observation:
        who = str(case.input.get("as", "alice"))
        payload = pack(load_function(case.input["function"]))
        body = {"function": base64.b64encode(payload).decode()}
        first = self.call(who, "POST", "/v1/functions", body)["function_id"]
        second = self.call(who, "POST", "/v1/functions", body)["function_id"]
        return Observation.ok(
            {
                "same_id": first == second,
                "id_is_sha256": first == hashlib.sha256(payload).hexdigest(),
            }
        )

    def _api_request(self, case: Case) -> Observation:
        raw = case.input
        who = raw.get("as")
        headers = dict(raw.get("headers", {}))
        if "token" in raw:
            headers["Authorization"] = f"Bearer {raw['token']}"
        elif who is not None:
            token = self.token(who)
            if raw.get("tamper"):
                token = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
            headers["Authorization"] = f"Bearer {token}"
        subs = {"endpoint": self.endpoint, "unknown_id": uuid.uuid4().hex}
        if "task_of" in raw:
            owner = raw["task_of"]
            echo = {"name": "echo", "source": _ECHO_SOURCE}
            subs["task_id"] = self.submit(owner, self.variables("valid"), [{"function": echo}])[0]
        body = raw.get("json")
        if _mentions(body, ("{echo_id}", "{echo_args}", "{variables:invalid}")):
            who_for_fn = who if isinstance(who, str) and who in self.profile["identities"] else None
            echo_id = self.register(who_for_fn or "alice", {"name": "echo", "source": _ECHO_SOURCE})
            subs["echo_id"] = echo_id
            subs["echo_args"] = base64.b64encode(pack(((1,), {}))).decode()
        content: bytes | None = None
        if "raw" in raw:
            content = str(raw["raw"]).encode()
            headers.setdefault("Content-Type", "application/json")
        elif raw.get("body_bytes") == "over_limit":
            limit = int(self.profile.get("max_body_bytes", 16 * 1024 * 1024))
            content = b'{"pad": "' + b"x" * (limit + 1024) + b'"}'
            headers.setdefault("Content-Type", "application/json")
        elif body is not None:
            body = _substitute(body, subs, self)
            content = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        path = str(raw["path"]).format(**subs)
        response = self.client().request(raw["method"], path, content=content, headers=headers)
        try:
            parsed: Any = response.json()
        except ValueError:
            parsed = None
        return Observation.ok(
            {"status": response.status_code, "reason": _reason_of(response), "body": parsed}
        )

    def _uep_probe(self, case: Case) -> Observation:
        who = str(case.input.get("as", "alice"))
        entry = self.account(who)
        whoami = {"name": "whoami", "source": _fixture_source(case, "whoami")}
        outcome = self.run_calls(case, [{"function": whoami}])[0]
        if "error" in outcome:
            return Observation.failed(outcome["error"], str(outcome.get("message")))
        if case.input.get("probe") == "endpoint":
            return self._endpoint_process(who)
        seen = outcome["value"]
        try:
            status = self.call(who, "GET", f"/v1/endpoints/{self.endpoint}/status")
        except _ApiFailure as exc:
            raise AdapterError(f"status refused: {exc}") from exc
        pids = {e.get("pid") for e in status.get("user_endpoints", [])}
        return Observation.ok(_relate(seen, entry, pids, self.profile.get("environment_keys", [])))

    def _endpoint_process(self, who: str) -> Observation:
        """The user endpoint process itself, as it answers the daemon's introspection
        (``GET /v1/endpoints/{endpoint}/introspect``): its descriptors."""
        try:
            answer = self.call(who, "GET", f"/v1/endpoints/{self.endpoint}/introspect")
        except _ApiFailure as exc:
            if exc.status == 404:
                raise Skip("this deployment does not offer user endpoint introspection") from exc
            raise AdapterError(f"introspect refused: {exc}") from exc
        entries = [e for e in answer.get("user_endpoints", []) if e.get("process")]
        if not entries:
            raise AdapterError("no ready user endpoint answered the introspection")
        process = entries[0]["process"]
        # What the process was handed at start; later descriptors are its engine's own.
        handed = process.get("inherited_fds", process["fds"])
        fds = sorted(int(d["fd"]) if isinstance(d, dict) else int(d) for d in handed)
        channel = process.get("channel_fd")
        return Observation.ok({"fds": "stdio+channel" if fds == [0, 1, 2, channel] else fds})

    def _uep_count(self, case: Case) -> Observation:
        who = str(case.input.get("as", "alice"))
        try:
            self.call(who, "POST", f"/v1/endpoints/{self.endpoint}/stop", {})
        except _ApiFailure as exc:
            raise AdapterError(f"stop refused: {exc}") from exc
        self._wait_no_endpoints(who)
        echo = {"name": "echo", "source": _ECHO_SOURCE}
        errors: list[str] = []
        for name in case.input["variable_sets"]:
            try:
                ids = self.submit(who, self.variables(name), [{"function": echo, "args": [1]}])
                outcome = _outcome(self.wait(who, ids)[ids[0]])
                if "error" in outcome:
                    errors.append(outcome["error"])
            except _ApiFailure as exc:
                errors.append(exc.reason or f"http.{exc.status}")
        status = self.call(who, "GET", f"/v1/endpoints/{self.endpoint}/status")
        live = [e for e in status.get("user_endpoints", []) if e.get("state") != "stopped"]
        return Observation.ok(
            {"endpoints": len({e.get("config_key") for e in live}), "errors": errors}
        )

    def _wait_no_endpoints(self, who: str) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            status = self.call(who, "GET", f"/v1/endpoints/{self.endpoint}/status")
            if not status.get("user_endpoints"):
                return
            time.sleep(0.1)  # polling a remote service with a deadline
        raise AdapterError("user endpoints did not stop within the timeout")

    def _restart(self, case: Case) -> Observation:
        command = self.profile.get("restart_command")
        if not command:
            raise Skip("the profile has no restart_command")
        who = str(case.input.get("as", "alice"))
        variables = self.variables("valid")
        echo = {"name": "echo", "source": _ECHO_SOURCE}
        sleeper = {"name": "sleep_for", "source": _SLEEP_SOURCE}
        finished = self.submit(who, variables, [{"function": echo, "args": ["before"]}])
        before = self.wait(who, finished)
        ids = list(finished)
        running = int(case.input.get("running", 0))
        queued = int(case.input.get("queued", 0))
        if running:
            ids += self.submit(who, variables, [{"function": sleeper, "args": [30]}] * running)
        if queued:
            ids += self.submit(
                who, variables, [{"function": echo, "args": [i]} for i in range(queued)]
            )
        try:
            subprocess.run(command, check=True, timeout=self.timeout, capture_output=True)
        except (OSError, subprocess.SubprocessError) as exc:
            raise AdapterError(f"restart_command failed: {exc}") from exc
        self.close()
        self._await_health()
        missing: list[str] = []
        views: dict[str, dict[str, Any]] = {}
        for task_id in ids:
            try:
                views[task_id] = self.call(who, "GET", f"/v1/tasks/{task_id}")
            except _ApiFailure as exc:
                if exc.status == 404:
                    missing.append(task_id)
                else:
                    raise AdapterError(f"reading {task_id} failed: {exc}") from exc
        pending = [t for t, v in views.items() if v.get("state") in ("queued", "running")]
        if pending:
            views.update(self.wait(who, pending))
        unexpected = [
            f"{t}: {v.get('error', {}).get('reason')}"
            for t, v in views.items()
            if v.get("state") != "success"
            and v.get("error", {}).get("reason") not in ("task.endpoint_lost",)
        ]
        first = finished[0]
        retrievable = (
            first in views
            and views[first].get("state") == "success"
            and views[first].get("result") == before[first].get("result")
        )
        return Observation.ok(
            {
                "missing": missing,
                "not_final": [
                    t for t, v in views.items() if v.get("state") in ("queued", "running")
                ],
                "unexpected": unexpected,
                "finished_retrievable": retrievable,
            }
        )

    def _await_health(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                if self.client().get("/healthz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # polling a restarting service with a deadline
        raise AdapterError("the daemon did not become healthy after the restart")


class _ApiFailure(Exception):
    def __init__(self, status: int, reason: str | None, text: str) -> None:
        self.status, self.reason = status, reason
        super().__init__(f"HTTP {status} {reason or ''}: {text}")


def _reason_of(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        reason = body["error"].get("reason")
        return reason if isinstance(reason, str) else None
    return None


def _outcome(view: Mapping[str, Any]) -> dict[str, Any]:
    if view.get("state") == "success":
        return {"value": unpack(base64.b64decode(view.get("result", "")))}
    error = dict(view.get("error") or {})
    return {
        "error": error.get("reason") or "task.failed",
        "type_name": error.get("type_name"),
        "message": error.get("message"),
        "traceback": error.get("traceback"),
    }


def _mentions(value: Any, needles: Sequence[str]) -> bool:
    text = json.dumps(value) if value is not None else ""
    return any(n in text for n in needles)


def _substitute(value: Any, subs: Mapping[str, str], adapter: HttpAdapter) -> Any:
    if isinstance(value, str):
        if value == "{variables:invalid}":
            return adapter.variables("invalid")
        return value.format(**subs) if "{" in value else value
    if isinstance(value, dict):
        return {k: _substitute(v, subs, adapter) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, subs, adapter) for v in value]
    return value


def _relate(
    seen: Mapping[str, Any],
    entry: pwd.struct_passwd,
    endpoint_pids: set[Any],
    extra_env: Sequence[str],
) -> dict[str, Any]:
    """What a probe saw, stated relative to the account it should run as."""
    uid_ok = all(u == entry.pw_uid for u in seen["uid"])
    gid_ok = all(g == entry.pw_gid for g in seen["gid"])
    expected_groups = set(os.getgrouplist(entry.pw_name, entry.pw_gid)) - {entry.pw_gid}
    groups = set(seen["groups"]) - {entry.pw_gid}
    allowed_env = BASE_ENVIRONMENT | set(extra_env)
    cap = seen.get("cap_eff")
    soft = (seen.get("nproc") or [-1])[0]
    return {
        "uid": "account" if uid_ok else seen["uid"],
        "gid": "account" if gid_ok else seen["gid"],
        "groups": "account"
        if groups == expected_groups
        else sorted(_group_name(g) for g in groups),
        "umask": seen["umask"],
        "cwd": "home" if seen["cwd"] == entry.pw_dir else seen["cwd"],
        "env_unexpected": sorted(k for k in seen["env_keys"] if k not in allowed_env),
        "session": "own" if seen["sid"] in endpoint_pids else f"sid {seen['sid']}",
        "cap_eff_zero": cap is not None and int(cap, 16) == 0,
        "nproc_limited": soft not in (-1, None),
    }


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _fixture_source(case: Case, name: str) -> str:
    spec = case.input.get("function") if isinstance(case.input, dict) else None
    if isinstance(spec, dict) and spec.get("name") == name:
        return str(spec["source"])
    raise AdapterError(f"the case does not carry the {name!r} probe function")


# The small functions the adapter itself needs (the same as the suite's fixtures).
_ECHO_SOURCE = "def echo(value=None):\n    return value\n"
_SLEEP_SOURCE = (
    "def sleep_for(seconds):\n    import time\n\n    time.sleep(seconds)\n    return seconds\n"
)
