#!/usr/bin/env python3
"""Record the behaviour of Globus Compute's reference packages, for mep's differential suite.

A development tool, not part of mep. It makes a throwaway virtual environment, installs
the reference packages there (``globus-compute-endpoint`` 4.19 and
``globus-identity-mapping``, from PyPI), runs itself inside it, and writes what the
reference *does* as JSON/YAML facts into ``tests/fixtures/gc/``:

- ``identity_vectors.json``: mapping documents and identity sets (the inputs are listed
  below, with what mep is meant to do: ``same``, or ``refused-by-design`` and why) and
  the reference's outcome: whether the file loads, each mapper's ``map_identities``
  answer and the name Globus Compute's endpoint would pick;
- ``template_cases.json``: templates (the reference's default one among them),
  variables, schema, runtime, identity and parent config, and the reference's
  rendering (text and YAML data) or its error, and whether it accepts the result;
- ``configure_multi_user/``: the files ``globus-compute-endpoint configure
  --multi-user`` writes (absolute paths replaced by ``@GC_DIR@``);
- ``uep_keys.json``: every key a user endpoint's configuration may hold in 4.19 (top
  level and per engine), from the reference's constructors;
- ``versions.json``: what was recorded with.

Only facts are carried over: outcomes, the files the reference writes, key names. No
code of the reference is copied into mep. The tests (``tests/test_gc_*.py``) read the
committed files and need neither the network nor these packages.

Usage: ``python tools/record_gc_vectors.py [--out DIR] [--venv DIR]`` (``--venv`` reuses
an environment that already has the packages). ``--inside`` is the internal mode that
runs in the throwaway environment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "gc"
REFERENCE_PACKAGES = ("globus-compute-endpoint==4.19.*", "globus-identity-mapping==0.5.*")
EXPR = "expression_identity_mapping#1.0.0"

# ---------------------------------------------------------------------------------------
# The inputs: identity-mapping vectors. Each: id, why, documents, identities (primary
# first), and what mep does: "same", or ("refused-by-design", reason).
# ---------------------------------------------------------------------------------------

SAME = "same"


def _refused(reason: str) -> dict[str, str]:
    return {"refused-by-design": reason}


def _ident(n: int, username: str | None = None, status: str = "used", **fields: Any) -> dict:
    ident = {
        "id": f"00000000-0000-4000-8000-{n:012d}",
        "sub": f"00000000-0000-4000-8000-{n:012d}",
        "identity_provider": "11111111-2222-3333-4444-555555555555",
        "identity_type": "login",
        "organization": "Example University",
        "name": "Alice Example",
        "email": None,
        "status": status,
    }
    if username is not None:
        ident["username"] = username
    ident.update(fields)
    return ident


def _rule(match: str, output: str = "{0}", source: str = "{username}", **extra: Any) -> dict:
    return {"source": source, "match": match, "output": output, **extra}


def _doc(*rules: dict, **extra: Any) -> dict:
    return {"DATA_TYPE": EXPR, **extra, "mappings": list(rules)}


DOMAIN = r"(.*)@example\.org"
HALF_ANCHORED = (
    "the reference anchors only the first and last alternative (^a|b$), so it takes a"
    " prefix through an alternative; mep counts only a match of the whole string"
)
TRAILING_NEWLINE = "the reference's $ also matches before a trailing newline; mep does not"
NOT_PORTABLE = "the produced name is not a portable POSIX user name (mep refuses it as an account)"
EXTENSION = "(? group extensions are Python syntax outside the dialect; mep refuses them at load"


def _identity_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def add(why: str, docs: Any, identities: list[dict], mep: Any = SAME) -> None:
        cases.append(
            {
                "id": f"id-{len(cases) + 1:03d}",
                "why": why,
                "documents": docs,
                "identities": identities,
                "mep": mep,
            }
        )

    one = [_doc(_rule(DOMAIN))]
    # -- the usual domain rule
    add("domain rule maps the local part", one, [_ident(1, "alice@example.org")])
    add("another domain does not map", one, [_ident(1, "alice@example.com")])
    add("a longer domain does not map", one, [_ident(1, "alice@example.org.evil.com")])
    add("a subdomain does not map", one, [_ident(1, "alice@sub.example.org")])
    add("the escaped dot is a dot", one, [_ident(1, "alice@exampleXorg")])
    add("case matters by default", one, [_ident(1, "alice@EXAMPLE.ORG")])
    add("trailing newline", one, [_ident(1, "alice@example.org\n")], _refused(TRAILING_NEWLINE))
    add("empty local part gives the empty name", one, [_ident(1, "@example.org")])
    add(
        "a local part with an @",
        one,
        [_ident(1, "a@b@example.org")],
        _refused(NOT_PORTABLE),
    )
    add(
        "the reference's own example, unescaped dot",
        [_doc(_rule("(.*)@example.com"))],
        [_ident(1, "alice@exampleXcom")],
    )
    add(
        "ignore_case matches, output keeps the case",
        [_doc(_rule(DOMAIN, ignore_case=True))],
        [_ident(1, "Alice@EXAMPLE.org")],
    )
    # -- the dialect: ordinary characters
    add("[a-z]+ is literal text", [_doc(_rule("[a-z]+", output="u"))], [_ident(1, "alice")])
    add("[a-z]+ matches itself", [_doc(_rule("[a-z]+", output="u"))], [_ident(1, "[a-z]+")])
    add("^ and $ are literal", [_doc(_rule("^alice$", output="u"))], [_ident(1, "alice")])
    add("^ and $ match themselves", [_doc(_rule("^alice$", output="u"))], [_ident(1, "^alice$")])
    add("+ is literal", [_doc(_rule("a+", output="u"))], [_ident(1, "aa")])
    add("braces are literal", [_doc(_rule("a{2}", output="u"))], [_ident(1, "aa")])
    add("braces match themselves", [_doc(_rule("a{2}", output="u"))], [_ident(1, "a{2}")])
    add(
        "a class of the POSIX kind is literal",
        [_doc(_rule("([[:alnum:]]*)@example\\.org"))],
        [_ident(1, "bob@example.org")],
    )
    add(
        "? makes optional",
        [_doc(_rule("alice(@example\\.org)?", output="u"))],
        [_ident(1, "alice")],
    )
    add("* repeats", [_doc(_rule("(a*)b", output="x{0}"))], [_ident(1, "aaab")])
    add(
        "escaped specials are ordinary",
        [_doc(_rule("\\(a\\|b\\)\\*\\?\\.", output="u"))],
        [_ident(1, "(a|b)*?.")],
    )
    add(
        "an escaped backslash before a letter is a load error too",
        [_doc(_rule("a\\\\b", output="u"))],
        [_ident(1, "a\\b")],
    )
    add(
        "an escaped backslash before a group",
        [_doc(_rule("a\\\\(b)", output="{0}"))],
        [_ident(1, "a\\b")],
    )
    add("a back-reference", [_doc(_rule("(a*)-\\1", output="{0}"))], [_ident(1, "aa-aa")])
    add(
        "a back-reference that does not match",
        [_doc(_rule("(a*)-\\1", output="{0}"))],
        [_ident(1, "aa-a")],
    )
    # -- the dialect: load-time errors
    add("\\d is a load error", [_doc(_rule("(\\d*)@example\\.org"))], [_ident(1, "1@example.org")])
    add("\\w is a load error", [_doc(_rule("\\w*"))], [_ident(1, "a")])
    add("\\@ is a load error", [_doc(_rule("(.*)\\@example\\.org"))], [_ident(1, "a@example.org")])
    add(
        "escaped backslash then a letter is a load error",
        [_doc(_rule("a\\\\d", output="u"))],
        [_ident(1, "a\\d")],
    )
    add(
        "lazy *? is a load error",
        [_doc(_rule("(.*?)@example\\.org"))],
        [_ident(1, "a@example.org")],
    )
    add("?? is a load error", [_doc(_rule("a??", output="u"))], [_ident(1, "a")])
    add(
        "? after an escaped * is a load error",
        [_doc(_rule("a\\*?", output="u"))],
        [_ident(1, "a*")],
    )
    add("a leading * is a load error", [_doc(_rule("*alice", output="u"))], [_ident(1, "alice")])
    add("a leading ? is a load error", [_doc(_rule("?alice", output="u"))], [_ident(1, "alice")])
    add(
        "an unbalanced parenthesis is a load error",
        [_doc(_rule("(a", output="u"))],
        [_ident(1, "a")],
    )
    add("** is a load error", [_doc(_rule("a**", output="u"))], [_ident(1, "a")])
    # -- the dialect: what mep refuses by design
    add(
        "half-anchored alternation: prefix",
        [_doc(_rule("alice|bob", output="u"))],
        [_ident(1, "alicex")],
        _refused(HALF_ANCHORED),
    )
    add(
        "alternation: the whole second alternative",
        [_doc(_rule("alice|bob", output="u"))],
        [_ident(1, "bob")],
    )
    add(
        "alternation: a prefix alternative wins in the reference",
        [_doc(_rule("a|ab", output="u"))],
        [_ident(1, "ab")],
        _refused(HALF_ANCHORED),
    )
    add(
        "alternation: the groups of a prefix match",
        [_doc(_rule("(.*)@x\\.org|(.*)", output="{0}"))],
        [_ident(1, "a@x.org.evil")],
        _refused(HALF_ANCHORED),
    )
    add(
        "alternation inside a group is anchored by the group",
        [_doc(_rule("(alice|bob)@example\\.org", output="{0}"))],
        [_ident(1, "bob@example.org")],
    )
    add(
        "a trailing backslash",
        [_doc(_rule("alice\\", output="u"))],
        [_ident(1, "alice$")],
        _refused(
            "a trailing backslash escapes the reference's own end anchor; mep refuses it at load"
        ),
    )
    add(
        "[ after an escaped backslash is a load error",
        [_doc(_rule("\\\\[ab\\\\]", output="u"))],
        [_ident(1, "\\a")],
    )
    add(
        "a non-capturing group",
        [_doc(_rule("(?:alice)", output="u"))],
        [_ident(1, "alice")],
        _refused(EXTENSION),
    )
    add(
        "a named group",
        [_doc(_rule("(?P<n>.*)@example\\.org", output="{0}"))],
        [_ident(1, "alice@example.org")],
        _refused(EXTENSION),
    )
    add(
        "a backslash in a literal match",
        [_doc(_rule("a\\.b", output="u", literal=True))],
        [_ident(1, "a\\xb")],
        _refused(
            "the reference's literal mode does not escape the character after a"
            " backslash; mep refuses a backslash in a literal match"
        ),
    )
    # -- literal
    add(
        "literal: dot is a dot",
        [_doc(_rule("alice@example.org", output="u", literal=True))],
        [_ident(1, "alice@exampleXorg")],
    )
    add(
        "literal: equal text",
        [_doc(_rule("alice@example.org", output="u", literal=True))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "literal: metacharacters",
        [_doc(_rule("a.*[b]+", output="u", literal=True))],
        [_ident(1, "a.*[b]+")],
    )
    add(
        "literal with ignore_case",
        [_doc(_rule("Alice@Example.org", output="u", literal=True, ignore_case=True))],
        [_ident(1, "ALICE@example.ORG")],
    )
    # -- options' types
    add(
        "ignore_case as the string 'false'",
        [_doc(_rule(DOMAIN, ignore_case="false"))],
        [_ident(1, "Alice@example.org")],
        _refused(
            'the reference takes any truthy value (so "false" is true); mep wants a'
            " JSON boolean and refuses the file"
        ),
    )
    add(
        "literal as 1",
        [_doc(_rule("a.b", output="u", literal=1))],
        [_ident(1, "a.b")],
        _refused("mep wants a JSON boolean for literal and refuses the file"),
    )
    # -- unknown keys
    add(
        "the reference's own example file (with a comment)",
        [_doc(_rule("(.*)@example.com"), comment="see the identity mapping guide")],
        [_ident(1, "alice@example.com")],
    )
    add(
        "a misspelt ignorecase is ignored",
        [_doc(_rule(DOMAIN, ignorecase=True))],
        [_ident(1, "Alice@EXAMPLE.org")],
    )
    # -- interpolation
    add(
        "source combining fields",
        [_doc(_rule("(.*)@example\\.org/Example University", source="{username}/{organization}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "output with a field",
        [_doc(_rule(".*@example\\.org", output="x{identity_type}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "output with two groups",
        [_doc(_rule("(.*)@(.*)\\.org", output="{1}_{0}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "nested groups numbered by opening parenthesis",
        [_doc(_rule("((al)ice)@example\\.org", output="{1}-{0}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "a null field in the source fails the document",
        [_doc(_rule(DOMAIN, source="{email}"), _rule(DOMAIN))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "a failed document passes to the next one",
        [_doc(_rule(DOMAIN, source="{email}")), _doc(_rule(DOMAIN, output="n_{0}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "a missing output field of a matching rule fails the document",
        [_doc(_rule(".*@example\\.org", output="{nickname}"), _rule(DOMAIN))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "a group that took no part, used in the output, fails the document",
        [_doc(_rule("(x)?alice@example\\.org", output="u{0}"))],
        [_ident(1, "alice@example.org")],
    )
    add(
        "an empty output decides: no fallback",
        [_doc(_rule(DOMAIN), _rule(".*", output="fallback"))],
        [_ident(1, "@example.org")],
    )
    add(
        "a group value with braces is not interpolated again",
        [_doc(_rule("(.*)-(.*)", output="{0}_{1}"))],
        [_ident(1, "a{1}-b")],
        _refused(
            "the reference substitutes {1} again inside {0}'s value; mep interpolates"
            " once, and the name (with braces) is no account"
        ),
    )
    add(
        "the id as source",
        [_doc(_rule("00000000-0000-4000-8000-(0*)7", source="{id}", output="id{0}"))],
        [_ident(7, "x")],
    )
    # -- selection
    two = [_ident(1, "alice@example.org"), _ident(2, "bob@campus.edu")]
    add("first rule with a match decides", [_doc(_rule("(.*)@campus\\.edu"), _rule(DOMAIN))], two)
    add(
        "first document with a result decides",
        [_doc(_rule("(.*)@nowhere\\.org")), _doc(_rule("(.*)@campus\\.edu", output="c_{0}"))],
        two,
    )
    add(
        "the primary identity decides within the rule",
        [_doc(_rule("(.*)@(example\\.org|campus\\.edu)"))],
        two,
    )
    add("a linked identity maps when the primary does not", [_doc(_rule("(.*)@campus\\.edu"))], two)
    add(
        "a closed linked identity is not mapped",
        [_doc(_rule("(.*)@campus\\.edu"))],
        [_ident(1, "alice@example.org"), _ident(2, "bob@campus.edu", status="closed")],
    )
    add(
        "an unused identity is not mapped",
        [_doc(_rule(DOMAIN))],
        [_ident(1, "alice@example.org", status="unused")],
    )
    add(
        "a private identity is mapped",
        [_doc(_rule(DOMAIN))],
        [_ident(1, "alice@example.org", status="private")],
    )
    add(
        "linked identities disagreeing, primary not matching",
        [_doc(_rule("(.*)@(campus\\.edu|lab\\.org)"))],
        [_ident(1, "alice@example.org"), _ident(2, "bob@campus.edu"), _ident(3, "carol@lab.org")],
        _refused(
            "the reference picks the first linked identity in the order the token"
            " lists them; mep refuses (identity.ambiguous_mapping) rather than let the"
            " client's order choose the account"
        ),
    )
    add(
        "linked identities agreeing",
        [_doc(_rule("(.*)@(campus\\.edu|lab\\.org)", output="{0}"))],
        [_ident(1, "x@example.org"), _ident(2, "bob@campus.edu"), _ident(3, "bob@lab.org")],
    )
    # -- documents
    add(
        "an unknown DATA_TYPE is skipped by the reference",
        [{"DATA_TYPE": "other_identity_mapping#1.0.0"}, _doc(_rule(DOMAIN))],
        [_ident(1, "alice@example.org")],
        _refused(
            "the reference skips a document of an unknown type with a log line; mep"
            " refuses the file, so no rule the administrator wrote is silently unused"
        ),
    )
    wrong_version = {**_doc(_rule(DOMAIN)), "DATA_TYPE": "expression_identity_mapping#2.0.0"}
    add("a wrong version of the expression type", [wrong_version], [_ident(1, "alice@example.org")])
    add(
        "a rule without output",
        [_doc({"source": "{username}", "match": DOMAIN})],
        [_ident(1, "alice@example.org")],
    )
    return cases


# ---------------------------------------------------------------------------------------
# The inputs: template cases. ``template`` is text, or "@default" (the reference's
# default template) or "@configure" (the one configure --multi-user writes). ``mep`` is
# "same" (equal YAML data, or both refuse) or {"differs-by-design": reason}.
# ---------------------------------------------------------------------------------------

ALICE = {
    "uname": "alice",
    "uid": 1001,
    "gid": 1001,
    "gecos": "Alice Example",
    "dir": "/home/alice",
    "shell": "/bin/bash",
}
MATCHED_ID = "00000000-0000-4000-8000-000000000001"
RUNTIME = {
    "globus_compute_sdk_version": "4.19.0",
    "globus_sdk_version": "3.65.0",
    "python_version": "3.11.7 (main, Jan  1 2025, 00:00:00) [GCC 12.2.0]",
    "python": {
        "version": "3.11.7",
        "version_description": "3.11.7 (main, Jan  1 2025, 00:00:00) [GCC 12.2.0]",
        "version_tuple": [3, 11, 7],
        "version_info": [3, 11, 7, "final", 0],
        "implementation": "CPython",
        "compiler": "GCC 12.2.0",
    },
    "platform": {
        "architecture": ["64bit", "ELF"],
        "machine": "x86_64",
        "node": "laptop",
        "platform": "Linux-6.1.0-x86_64-with-glibc2.36",
        "processor": "",
        "release": "6.1.0",
    },
}
ENV = {"HOME": "/home/alice", "PATH": "/usr/local/bin:/usr/bin:/bin", "SITE": "hpc"}


def _template_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []

    def add(why: str, template: str, variables: Any = None, mep: Any = SAME, **extra: Any) -> None:
        case = {
            "id": f"tpl-{len(cases) + 1:03d}",
            "why": why,
            "template": template,
            "variables": variables or {},
            "mep": mep,
        }
        case.update(extra)
        cases.append(case)

    add("the default template, no variables", "@default")
    add(
        "the default template with worker_init (the issue's break)",
        "@default",
        {"worker_init": "module load python"},
        user_runtime=RUNTIME,
    )
    add(
        "the default template with everything",
        "@default",
        {
            "worker_init": "source ~/env.sh",
            "endpoint_setup": "echo setup",
            "requirements": "numpy\nscipy>=1.10",
        },
        user_runtime=RUNTIME,
        schema="@default",
    )
    add("the default template with only a runtime", "@default", user_runtime=RUNTIME)
    add(
        "the default template with worker_init and no runtime: invalid YAML in both",
        "@default",
        {"worker_init": "module load python"},
    )
    add(
        "the default template with the runtime mep's client sends (no Globus SDK)",
        "@default",
        {"worker_init": "module load python"},
        user_runtime={k: v for k, v in RUNTIME.items() if not k.startswith("globus")},
    )
    add(
        "configure --multi-user's template and schema",
        "@configure",
        {"requirements": "pandas"},
        user_runtime=RUNTIME,
        schema="@configure",
    )
    add(
        "the schema refuses an empty requirements",
        "@configure",
        {"requirements": ""},
        schema="@configure",
    )
    add("a reserved name is refused", "x: 1\n", {"_GC": 1})
    add("a reserved name is refused (user_runtime)", "x: 1\n", {"user_runtime": {}})
    add("an undefined variable is refused", "endpoint_setup: {{ nothing }}\n")
    add("a sandbox escape is refused", "endpoint_setup: {{ ''.__class__.__mro__ }}\n")
    add(
        "a hostile value stays one scalar",
        "endpoint_setup: {{ v }}\n",
        {"v": "x\nengine:\n  type: ThreadPoolEngine\n# \" '"},
    )
    add(
        "shell_escape of a user value",
        "endpoint_setup: {{ v | shell_escape }}\n",
        {"v": "a b; rm -rf ~ 'q'"},
    )
    add(
        "default('\"\"') | shell_escape renders ''",
        "endpoint_setup: {{ v | default('\"\"') | shell_escape }}\n",
    )
    add(
        "shell_escape of a number passes through",
        "idle_heartbeats_soft: {{ n | shell_escape }}\n",
        {"n": 3},
    )
    add(
        "shell_escape of a literal that is not JSON fails",
        "endpoint_setup: {{ 'a b' | shell_escape }}\n",
    )
    add(
        "the quoted comparison",
        "display_name: {% if p == '\"gpu\"' %}quoted{% else %}bare{% endif %}\n",
        {"p": "gpu"},
    )
    add(
        "mapped identity, the reference's names",
        "endpoint_setup: {{ _GC.mapped_identity.local.uname }} {{ _GC.mapped_identity.local.uid }}"
        " {{ _GC.mapped_identity.local.gid }} {{ _GC.mapped_identity.local.dir }}/x"
        " {{ _GC.mapped_identity.local.shell }}\n",
    )
    add(
        "mapped identity groups",
        "idle_heartbeats_soft: {{ _GC.mapped_identity.local.groups[0] }}\n",
    )
    add("mapped identity gecos", "display_name: {{ _GC.mapped_identity.local.gecos }}\n")
    add("the matched Globus identity", "display_name: {{ _GC.mapped_identity.globus.id }}\n")
    add(
        "the deprecated bare names",
        "display_name: {{ mapped_identity.local.uname }}-{{ user_runtime.python.version }}\n",
        user_runtime=RUNTIME,
    )
    add(
        "user_runtime fields are quoted like variables",
        "display_name: {{ _GC.user_runtime.python.version_tuple | join('.') }}"
        " {{ _GC.user_runtime.globus_compute_sdk_version[1:-1] }}\n",
        user_runtime=RUNTIME,
    )
    add(
        "parent_config.display_name",
        "display_name: {{ _GC.parent_config.display_name }}\n",
        parent_config={"display_name": "HPC-Login"},
    )
    add("the environment", "endpoint_setup: {{ _GC.env.SITE }} {{ _GC.env.HOME }}/bin\n")
    add(
        "a boolean variable",
        "engine:\n  type: GlobusComputeEngine\n  worker_debug: {{ b }}\n",
        {"b": True},
    )
    add("a null variable", "endpoint_setup: {{ v }}\n", {"v": None})
    add(
        "loop over a list variable",
        'endpoint_setup: "{% for x in xs %}{{ x[1:-1] }};{% endfor %}"\n',
        {"xs": ["a", "b"]},
    )
    add("an object variable's member", "display_name: {{ d.name }}\n", {"d": {"name": "n"}})
    add(
        "a list variable printed whole",
        "allowed_functions: {{ xs }}\n",
        {"xs": ["a", "b"]},
        {
            "differs-by-design": "the reference prints a list as Python's repr, so each item keeps"
            " its JSON quotes inside YAML single quotes ('\"a\"'); mep prints JSON text, whose"
            " items read back as the strings themselves",
            "data": {"allowed_functions": ["a", "b"]},
        },
    )
    add(
        "a small float variable",
        "heartbeat_period: {{ f }}\n",
        {"f": 0.00001},
        {
            "differs-by-design": "the reference prints 1e-05, which YAML reads as a string;"
            " mep prints 1.0e-05, which YAML reads as the number",
            "data": {"heartbeat_period": 0.00001},
        },
    )
    add(
        "include of a sibling file",
        "{% include 'common.yaml.j2' %}\nidle_heartbeats_soft: 2\n",
        includes={"common.yaml.j2": "display_name: common\n"},
    )
    add(
        "a rendered GlobusComputeEngine with a Slurm provider",
        "engine:\n  type: GlobusComputeEngine\n  max_workers_per_node: {{ n }}\n"
        "  provider:\n    type: SlurmProvider\n    partition: {{ p }}\n"
        "    walltime: {{ w }}\n    launcher:\n      type: SrunLauncher\n",
        {"n": 4, "p": "debug", "w": "00:30:00"},
    )
    add(
        "keys mep accepts and ignores",
        "amqp_port: 443\ndebug: true\n"
        "engine:\n  type: GlobusComputeEngine\n  label: mine\n"
        "  provider: {type: LocalProvider, init_blocks: 0}\n",
    )
    return cases


# ---------------------------------------------------------------------------------------
# Inside the throwaway environment: run the reference.
# ---------------------------------------------------------------------------------------


def _reference_mapping(case: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from globus_compute_endpoint.endpoint.identity_mapper import PosixIdentityMapper

    path = workdir / f"{case['id']}.json"
    path.write_text(json.dumps(case["documents"]))
    try:
        mapper = PosixIdentityMapper(path, "ep-under-test", poll_interval_s=3600)
    except Exception as exc:  # the file does not load
        return {"loaded": False, "load_error": f"{type(exc).__name__}: {exc}"}
    try:
        answers = mapper.map_identities(case["identities"])
    finally:
        mapper.stop_watching()
    # What the endpoint does with them (core_endpoint): the first mapper with a result,
    # its first (rule) dict, that dict's first identity, its first name; an empty or
    # missing name is a failure to map.
    username = None
    matched = None
    for answer in answers:
        if answer:
            matched, names = next(iter(answer[0].items()))
            username = names[0]
            break
    return {
        "loaded": True,
        "mappers": answers,
        "matched_identity": matched if username else None,
        "username": username or None,
    }


def _mapped_identity(matched: str | None) -> Any:
    import pwd

    from globus_compute_endpoint.endpoint.identity_mapper import MappedPosixIdentity

    record = pwd.struct_passwd(
        ("alice", "x", 1001, 1001, "Alice Example", "/home/alice", "/bin/bash")
    )
    return MappedPosixIdentity(record, [], matched)


def _reference_render(case: dict[str, Any], files: dict[str, str], workdir: Path) -> dict:
    import yaml
    from globus_compute_endpoint.endpoint.config import CoreEndpointConfig
    from globus_compute_endpoint.endpoint.config.utils import (
        load_config_yaml,
        render_config_user_template,
    )

    template = files.get(case["template"], case["template"])
    folder = workdir / case["id"]
    folder.mkdir()
    for name, text in case.get("includes", {}).items():
        (folder / name).write_text(text)
    template_path = folder / "user_config_template.yaml.j2"
    template_path.write_text(template)
    schema = json.loads(files["schema" + case["schema"]]) if "schema" in case else None
    parent = CoreEndpointConfig(**case.get("parent_config", {}))
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(ENV)
    try:
        text = render_config_user_template(
            parent,
            template,
            template_path,
            _mapped_identity(MATCHED_ID),
            schema,
            case["variables"],
            case.get("user_runtime"),
        )
    except Exception as exc:
        return {"rendered": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out: dict[str, Any] = {"rendered": True, "text": text}
    try:
        out["data"] = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        out["yaml_error"] = str(exc)[:300]
        return out
    try:
        config = load_config_yaml(text)
    except BaseException as exc:  # ClickException is not an Exception subclass everywhere
        out["accepted"] = False
        out["accept_error"] = f"{type(exc).__name__}: {exc}"[:300]
    else:
        out["accepted"] = True
        engine = getattr(config, "engine", None)
        if engine is not None and hasattr(engine, "shutdown"):
            with contextlib.suppress(Exception):  # nothing was started
                engine.shutdown()
    return out


def _signature_keys(*targets: Any) -> list[str]:
    import inspect

    keys: list[str] = []
    for target in targets:
        for name, param in inspect.signature(target).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name not in keys:
                keys.append(name)
    return keys


def _samples(default: Any) -> list[Any]:
    """Values to try for a key, its default first (when YAML can write it)."""
    tries: list[Any] = []
    if isinstance(default, bool | int | float | str):
        tries.append(default)
    if isinstance(default, tuple):
        tries.append(list(default))
    uuid = "0b6a3c6e-1111-4222-8333-444455556666"
    return [
        *tries,
        "x",
        1,
        True,
        1.5,
        ["x"],
        [1, 2],
        {},
        uuid,
        [uuid],
        "docker",
        {"type": "LocalProvider"},
    ]


def _accepted(config: dict[str, Any]) -> bool:
    import yaml
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    try:
        loaded = load_config_yaml(yaml.safe_dump(config))
    except BaseException:  # ClickException, pydantic errors, typeguard errors
        return False
    engine = getattr(loaded, "engine", None)
    if engine is not None:
        with contextlib.suppress(Exception):  # nothing was started
            engine.shutdown()
    return True


def _uep_keys() -> dict[str, Any]:
    """Every key a user endpoint's YAML may hold in 4.19, found by asking the reference's
    loader (``load_config_yaml``) with a sample value for each constructor parameter:
    accepted keys with the value that was accepted, and the parameters no YAML value
    makes acceptable."""
    import concurrent.futures
    import inspect

    from globus_compute_endpoint.endpoint.config import UserEndpointConfig
    from globus_compute_endpoint.endpoint.config.config import BaseConfig
    from globus_compute_endpoint.engines import (
        GlobusComputeEngine,
        ProcessPoolEngine,
        ThreadPoolEngine,
    )
    from globus_compute_endpoint.engines.base import GlobusComputeEngineBase
    from parsl.executors import HighThroughputExecutor

    def defaults(*targets: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for target in targets:
            for name, param in inspect.signature(target).parameters.items():
                out.setdefault(name, param.default)
        return out

    base_engine = {"type": "ThreadPoolEngine"}
    result: dict[str, Any] = {"top_level": {}, "engines": {}, "refused": {}}
    top = defaults(UserEndpointConfig.__init__, BaseConfig.__init__)
    for key in _signature_keys(UserEndpointConfig.__init__, BaseConfig.__init__):
        if key in ("engine", "high_assurance"):
            continue
        for value in _samples(top[key]):
            if _accepted({"engine": base_engine, key: value}):
                result["top_level"][key] = value
                break
        else:
            result["refused"][key] = "no YAML value accepted"
    engines = {
        "GlobusComputeEngine": (
            GlobusComputeEngine.__init__,
            GlobusComputeEngineBase.__init__,
            HighThroughputExecutor.__init__,
        ),
        "ThreadPoolEngine": (
            ThreadPoolEngine.__init__,
            GlobusComputeEngineBase.__init__,
            concurrent.futures.ThreadPoolExecutor.__init__,
        ),
        "ProcessPoolEngine": (
            ProcessPoolEngine.__init__,
            GlobusComputeEngineBase.__init__,
            concurrent.futures.ProcessPoolExecutor.__init__,
        ),
    }
    for engine, targets in engines.items():
        known = defaults(*targets)
        accepted: dict[str, Any] = {}
        for key in _signature_keys(*targets):
            for value in _samples(known[key]):
                if _accepted({"engine": {"type": engine, key: value}}):
                    accepted[key] = value
                    break
            else:
                result["refused"][f"{engine}.{key}"] = "no YAML value accepted"
        result["engines"][engine] = accepted
    return result


def _configure(workdir: Path) -> dict[str, str]:
    home = workdir / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("GLOBUS_COMPUTE_USER_DIR", None)
    exe = Path(sys.executable).parent / "globus-compute-endpoint"
    subprocess.run(
        [
            str(exe),
            "configure",
            "--multi-user",
            "true",
            "--contact-email",
            "admin@example.org",
            "gc-mu",
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    folder = home / ".globus_compute" / "gc-mu"
    return {
        p.name: p.read_text().replace(str(folder), "@GC_DIR@")
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def _default_template() -> str:
    import globus_compute_endpoint.endpoint.config as config_package

    folder = Path(config_package.__file__).parent
    return (folder / "user_config_template.yaml.j2").read_text()


def _versions() -> dict[str, str]:
    import importlib.metadata
    import platform

    names = (
        "globus-compute-endpoint",
        "globus-compute-sdk",
        "globus-identity-mapping",
        "parsl",
        "jinja2",
        "pyyaml",
    )
    out = {n: importlib.metadata.version(n) for n in names}
    out["python"] = platform.python_version()
    return out


def inside(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gc-record-") as tmp:
        workdir = Path(tmp)
        configured = _configure(workdir)
        identity = []
        for case in _identity_cases():
            identity.append({**case, "reference": _reference_mapping(case, workdir)})
        import globus_compute_endpoint.endpoint.config as config_package

        files = {
            "@default": _default_template(),
            "@configure": configured["user_config_template.yaml.j2"],
            "schema@default": (
                Path(config_package.__file__).parent / "user_config_schema.json"
            ).read_text(),
            "schema@configure": configured["user_config_schema.json"],
        }
        templates = [
            {**case, "reference": _reference_render(case, files, workdir)}
            for case in _template_cases()
        ]
    (out / "configure_multi_user").mkdir(exist_ok=True)
    for name, text in configured.items():
        (out / "configure_multi_user" / name).write_text(text)
    (out / "default_user_config_template.yaml.j2").write_text(files["@default"])
    (out / "default_user_config_schema.json").write_text(files["schema@default"])
    _write_json(out / "identity_vectors.json", {"format": 1, "vectors": identity})
    _write_json(
        out / "template_cases.json",
        {
            "format": 1,
            "identity": ALICE,
            "matched_identity": MATCHED_ID,
            "environment": ENV,
            "files": {
                "@default": "default_user_config_template.yaml.j2",
                "@configure": "configure_multi_user/user_config_template.yaml.j2",
                "schema@default": "default_user_config_schema.json",
                "schema@configure": "configure_multi_user/user_config_schema.json",
            },
            "cases": templates,
        },
    )
    _write_json(out / "uep_keys.json", _uep_keys())
    _write_json(out / "versions.json", _versions())


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--venv", type=Path, help="an environment with the reference packages")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        inside(args.out)
        return 0
    made = None
    venv = args.venv
    if venv is None:
        made = Path(tempfile.mkdtemp(prefix="gc-reference-"))
        venv = made / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", *REFERENCE_PACKAGES], check=True
        )
    try:
        subprocess.run(
            [str(venv / "bin" / "python"), __file__, "--inside", "--out", str(args.out)],
            check=True,
            cwd=tempfile.gettempdir(),
        )
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    print(f"recorded into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
