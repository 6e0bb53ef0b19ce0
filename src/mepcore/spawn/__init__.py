"""Spawn plans, the launcher and the stop ladder for user endpoint processes.

- ``plan_spawn`` (pure) decides argv, environment, cwd, identity, umask and limits;
- ``check_runtime_readable`` proves the account can run the interpreter and packages;
- ``launch`` executes a plan (no pre-exec Python hook) and sets its resource limits;
- ``stop_ladder`` / ``stop_ladder_blocking`` ask, SIGTERM, SIGKILL, then reap the session.

Deliberately not here: the channel protocol and the registry (both in mepd).
"""

from mepcore.spawn.access import check_runtime_readable, permits, unreachable_reason
from mepcore.spawn.launcher import (
    LaunchedProcess,
    StopOutcome,
    apply_limits,
    become_subreaper,
    kill_session,
    launch,
    reap_adopted_orphans,
    session_members,
    stop_ladder,
    stop_ladder_blocking,
)
from mepcore.spawn.plan import (
    IDENTITY_KEYS,
    SAFE_PATH,
    UMASK,
    ResourceLimits,
    SpawnPlan,
    SpawnSettings,
    environment_violations,
    plan_spawn,
)

__all__ = [
    "IDENTITY_KEYS",
    "SAFE_PATH",
    "UMASK",
    "LaunchedProcess",
    "ResourceLimits",
    "SpawnPlan",
    "SpawnSettings",
    "StopOutcome",
    "apply_limits",
    "become_subreaper",
    "check_runtime_readable",
    "environment_violations",
    "kill_session",
    "launch",
    "permits",
    "plan_spawn",
    "reap_adopted_orphans",
    "session_members",
    "stop_ladder",
    "stop_ladder_blocking",
    "unreachable_reason",
]
