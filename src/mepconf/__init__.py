"""mepconf: the mep conformance runner.

Runs the data-driven conformance cases of ``conformance/`` against a deployment through
an adapter (in-process mepcore, a running mepd over HTTP, or any implementation speaking
the JSON-lines exec protocol) and reports pass / fail / skip / error per case.

Layering: nothing in this package imports ``mepcore`` or ``mepd`` except
``mepconf.adapters.inprocess`` (and the reference harness that wraps it), so the runner
can check implementations that share no code with this one.
"""

from __future__ import annotations

__all__ = ["EXEC_PROTOCOL", "SUITE_FORMAT"]

# Version of the case-file format (conformance/schema/case.schema.json).
SUITE_FORMAT = 1
# Version of the JSON-lines protocol spoken by the exec adapter.
EXEC_PROTOCOL = "mepconf-exec/1"
