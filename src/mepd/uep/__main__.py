"""``python -m mepd.uep``: the user endpoint entry point (see ``mepd.uep``)."""

import os
import sys

from mepd.uep import main

code = main()
sys.stdout.flush()
sys.stderr.flush()
# The final frame is sent and the executor shut down: leave now. A normal interpreter
# exit would wait for a thread still running a stuck task (the thread engine cannot
# kill one), and the daemon would have to escalate to signals for nothing.
os._exit(code)
