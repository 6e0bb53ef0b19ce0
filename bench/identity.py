"""Identity mapping latency: expression rules at several sizes, and an external program.

Rows (``IdentityMapper.map`` on a linked set of three identities, timed one call at a time):
- expression documents of 1, 10, 100 and 1,000 rules, for an identity the *last* rule
  maps (every rule is tried: the worst case) and one no rule maps;
- the same mapping followed by ``check_account`` against the password database (what the
  daemon does per request);
- an external program: a ``/bin/sh`` script with a fixed answer (the floor: fork, exec,
  JSON on pipes, the answer's checks) and the shipped ``examples/identity/
  example_mapper.py`` run by ``/usr/bin/python3`` (a realistic program).

There is no peer to compare with in the same run: Globus Compute's mapping runs inside
its service. Usage: python bench/identity.py [--smoke] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import pwd
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Stats, fmt_seconds, print_table, time_calls, write_json

from mepcore.identity import AccountPolicy, IdentityMapper, check_account
from mepcore.ports import SystemAccountDatabase
from mepcore.types import Identity, IdentitySet

SH_PROGRAM = """#!/bin/sh
cat >/dev/null
printf '%s' '{"DATA_TYPE": "identity_mapping_output#1.0.0", "result": [{"id": "ID-0", "output": "root"}]}'
"""


def identity_set(username: str) -> IdentitySet:
    """The caller plus two linked identities that no rule maps."""
    return IdentitySet(
        [
            Identity("ID-0", {"id": "ID-0", "username": username, "email": "x@mail.example"}),
            Identity("ID-1", {"id": "ID-1", "username": "linked1@other.example"}),
            Identity("ID-2", {"id": "ID-2", "username": "linked2@other.example"}),
        ]
    )


def expression_mapper(rules: int) -> IdentityMapper:
    document = {
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mep_match_syntax": "python",
        "mappings": [
            {
                "source": "{username}",
                "match": f"([a-z][a-z0-9_]{{0,30}})@dept{i}\\.example\\.edu",
                "output": "{0}",
            }
            for i in range(rules)
        ],
    }
    return IdentityMapper.from_documents([document], source=f"<{rules} rules>")


def row(name: str, samples: list[float], produced: str | None) -> list[str]:
    stats = Stats.of(samples)
    return [
        name,
        str(stats.count),
        *(fmt_seconds(v) for v in (stats.min, stats.p50, stats.p95, stats.max)),
        produced or "(none)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts (for tests)")
    parser.add_argument("--json", help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    sizes = [1, 10] if args.smoke else [1, 10, 100, 1_000]
    calls = 50 if args.smoke else 2_000
    program_calls = 5 if args.smoke else 100

    rows: list[list[str]] = []
    figures: dict[str, Any] = {}
    # A real account that passes the checks: the first ordinary one of this machine
    # (a system account, so its nologin shell is allowed for the measurement).
    accounts = SystemAccountDatabase()
    policy = AccountPolicy(min_uid=1, daemon_uid=os.getuid(), allow_nologin_shell=True)
    me_name = next(
        e.pw_name for e in pwd.getpwall() if e.pw_uid not in (0, os.getuid()) and e.pw_uid > 0
    )
    for size in sizes:
        mapper = expression_mapper(size)
        hit = identity_set(f"{me_name}@dept{size - 1}.example.edu")
        miss = identity_set("stranger@nowhere.example")
        produced = mapper.map(hit).username
        assert produced == me_name, produced
        assert mapper.map(miss).username is None
        hit_samples = time_calls(lambda m=mapper, s=hit: m.map(s), calls)
        miss_samples = time_calls(lambda m=mapper, s=miss: m.map(s), calls)

        def map_and_check(m: IdentityMapper = mapper, s: IdentitySet = hit) -> None:
            name = m.map(s).username
            assert name is not None
            check_account(name, accounts, policy)

        checked = time_calls(map_and_check, calls)
        rules = f"{size:,} rule" + ("s" if size != 1 else "")
        rows.append(row(f"expression, {rules}, last rule maps", hit_samples, produced))
        rows.append(row(f"expression, {rules}, no rule maps", miss_samples, None))
        rows.append(row(f"expression, {rules}, map + check_account", checked, produced))
        figures[f"expression_{size}"] = {
            "hit": Stats.of(hit_samples).to_dict(),
            "miss": Stats.of(miss_samples).to_dict(),
            "checked": Stats.of(checked).to_dict(),
        }

    with tempfile.TemporaryDirectory(prefix="mep-bench-identity-") as top:
        script = Path(top) / "fixed.sh"
        script.write_text(SH_PROGRAM)
        script.chmod(stat.S_IRWXU)
        programs = [
            ("external program, /bin/sh fixed answer", [str(script)], "someone@x.example"),
            (
                "external program, example_mapper.py",
                [
                    "/usr/bin/python3",
                    "-I",
                    str(REPO / "examples" / "identity" / "example_mapper.py"),
                    "--domain",
                    "partner.example.net",
                ],
                "carol@partner.example.net",
            ),
        ]
        for name, command, username in programs:
            document = {"DATA_TYPE": "external_identity_mapping#1.0.0", "command": command}
            mapper = IdentityMapper.from_documents([document], source=name)
            ids = identity_set(username)
            produced = mapper.map(ids).username
            samples = time_calls(lambda m=mapper, s=ids: m.map(s), program_calls)
            rows.append(row(name, samples, produced))
            figures[name] = Stats.of(samples).to_dict()

    print_table(
        "Identity mapping latency (IdentityMapper.map, one call at a time)",
        ["mapping", "n", "min", "p50", "p95", "max", "name produced"],
        rows,
        [
            "a linked set of three identities; the caller's identity is the one mapped",
            "check_account: the password database lookup and the refusal rules of DESIGN §3.2",
            "no peer in the same run: the reference service maps inside its cloud service",
        ],
    )
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
