"""External mapping programs (``external_identity_mapping#1.0.0``).

The program receives ``{"DATA_TYPE": "identity_mapping_input#1.0.0", "identities":
[...]}`` on stdin and must answer ``{"DATA_TYPE": "identity_mapping_output#1.0.0",
"result": [{"id": ..., "output": ...}, ...]}`` on stdout with exit status 0. Anything
else fails the mapping with its own reason code: it could not start or exited non-zero
(``identity.mapper_failed``), ran too long (``identity.mapper_timeout``), wrote too much
(``identity.mapper_output_too_large``), or answered something that is not that
document, names an identity that was not asked about, or gives one identity two names
(``identity.mapper_output_invalid``).

Deliberately not here: how the program is run (``runner``) and checks on the produced
name (``accounts``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from typing import Any

import attrs

from mepcore.errors import IdentityError
from mepcore.identity.runner import CommandRunner
from mepcore.identity.schema import INPUT_TYPE, output_violations
from mepcore.types import Identity


@attrs.frozen
class ExternalMapper:
    """One external document: the program's argv."""

    command: tuple[str, ...]

    def matches(
        self,
        identities: Sequence[Identity],
        runner: CommandRunner,
        *,
        timeout: float,
        max_output: int,
    ) -> list[tuple[Identity, str]]:
        """``(identity, name)`` for every identity the program mapped, in the order of
        ``identities`` (which is also the order the program is given them in).

        Raises ``IdentityError`` when the program fails in any way (fail closed).
        """
        request = {"DATA_TYPE": INPUT_TYPE, "identities": [i.to_dict() for i in identities]}
        stdin = json.dumps(request, separators=(",", ":")).encode()
        outcome = runner.run(self.command, stdin, timeout=timeout, max_output=max_output)
        program = shlex.join(self.command)[:200]
        stderr = outcome.stderr.decode(errors="replace").strip()
        context = {"command": list(self.command), "stderr": stderr}
        if outcome.returncode != 0:
            last_line = stderr.splitlines()[-1] if stderr else ""
            raise IdentityError(
                "identity.mapper_failed",
                f"mapping program {program!r} exited with status {outcome.returncode}"
                + (f": {last_line[:200]}" if last_line else ""),
                context=context,
            )
        answer = _parse_answer(outcome.stdout, program, context)
        names: dict[str, str] = {}
        for position, entry in enumerate(answer["result"]):
            ident, output = entry["id"], entry["output"]
            if all(i.id != ident for i in identities):
                raise IdentityError(
                    "identity.mapper_output_invalid",
                    f"mapping program {program!r} answered for identity {ident!r}"
                    f" ($.result[{position}].id), which was not in its input",
                    context=context,
                )
            if ident in names and names[ident] != output:
                raise IdentityError(
                    "identity.mapper_output_invalid",
                    f"mapping program {program!r} gave identity {ident!r} two names"
                    f" ($.result[{position}])",
                    context=context,
                )
            names[ident] = output
        return [(i, names[i.id]) for i in identities if names.get(i.id)]


def _parse_answer(stdout: bytes, program: str, context: dict[str, Any]) -> dict[str, Any]:
    try:
        answer = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IdentityError(
            "identity.mapper_output_invalid",
            f"mapping program {program!r} did not answer JSON: {exc}",
            context=context,
        ) from exc
    violations = output_violations(answer)
    if violations:
        first = violations[0]
        raise IdentityError(
            "identity.mapper_output_invalid",
            f"mapping program {program!r} answered an invalid document:"
            f" {first.path}: {first.message}",
            violations=violations,
            context=context,
        )
    assert isinstance(answer, dict)
    return answer
