"""``python -m mepd.uep``: the user endpoint entry point (see ``mepd.uep.entry``)."""

import gc

# A start allocates a great deal and frees almost nothing (imports, classes): automatic
# collections would walk that heap again and again for nothing (~8 ms of a start,
# docs/performance.md). The start turns the collector back on before the executor
# starts, so that forked workers and tasks run with it (mepd.uep.server).
gc.disable()

import os  # noqa: E402
import sys  # noqa: E402

from mepd.uep.entry import main  # noqa: E402

code = main()
sys.stdout.flush()
sys.stderr.flush()
# The final frame is sent and the executor shut down: leave now. A normal interpreter
# exit would wait for a thread still running a stuck task (the thread engine cannot
# kill one), and the daemon would have to escalate to signals for nothing.
os._exit(code)
