"""Spawn plans, the launcher and the stop ladder for user endpoint processes.

- ``plan_spawn`` (pure) decides argv, environment, cwd, identity, umask and limits;
- ``check_runtime_readable`` proves the account can run the interpreter and packages;
- ``launch`` executes a plan (no pre-exec Python hook) and sets its resource limits;
  a failed privilege drop is diagnosed (``diagnose_privilege_drop``) and named;
- ``prepare_cgroups`` / ``probe_cgroups``: a cgroup of its own for each user endpoint;
- ``stop_ladder`` / ``stop_ladder_blocking`` ask, SIGTERM, SIGKILL, then reap the session
  and end the cgroup.

Deliberately not here: the channel protocol and the registry (both in mepd).
"""

from mepcore.spawn.access import check_runtime_readable, permits, unreachable_reason
from mepcore.spawn.cgroup import (
    CgroupLayout,
    CgroupProbe,
    Cgroups,
    CgroupSettings,
    EndpointCgroup,
    Hierarchy,
    discover,
    prepare_cgroups,
    probe_cgroups,
)
from mepcore.spawn.cgroup_port import CgroupPort, SystemCgroupPort
from mepcore.spawn.launcher import (
    LaunchedProcess,
    StopOutcome,
    apply_limits,
    become_subreaper,
    diagnose_privilege_drop,
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
    START_DIRECTORY,
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
    "START_DIRECTORY",
    "UMASK",
    "CgroupLayout",
    "CgroupPort",
    "CgroupProbe",
    "CgroupSettings",
    "Cgroups",
    "EndpointCgroup",
    "Hierarchy",
    "LaunchedProcess",
    "ResourceLimits",
    "SpawnPlan",
    "SpawnSettings",
    "StopOutcome",
    "SystemCgroupPort",
    "apply_limits",
    "become_subreaper",
    "check_runtime_readable",
    "diagnose_privilege_drop",
    "discover",
    "environment_violations",
    "kill_session",
    "launch",
    "permits",
    "plan_spawn",
    "prepare_cgroups",
    "probe_cgroups",
    "reap_adopted_orphans",
    "session_members",
    "stop_ladder",
    "stop_ladder_blocking",
    "unreachable_reason",
]
