"""mepd.malloc: pinned glibc thresholds stop megabyte copies from faulting in fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from mepd.malloc import ADMIN_VARIABLES, pin_thresholds

# Copies 1 MiB buffers the way a worker does per round trip (read, unpickle, result,
# frame), after a warm-up, and prints the minor page faults of the measured rounds.
_PROBE = """
import resource, sys
from mepd.malloc import pin_thresholds
if sys.argv[1] == "pin":
    assert pin_thresholds({}), "mallopt refused"

def round_trip(n):
    received = b"\\x01" * n
    argument = bytes(received)
    result = argument + b""
    framed = b"\\x00\\x00\\x00\\x00" + result
    return len(framed)

for _ in range(5):
    round_trip((1 << 20) + 17)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(40):
    round_trip((1 << 20) + 17 + i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return int(out.stdout)


def test_pinned_thresholds_keep_megabyte_copies_off_fresh_pages() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the thresholds are glibc's; this machine's C library is another")
    default, pinned = faults("default"), faults("pin")
    # Unpinned, glibc maps (and faults in) most of these 1 MiB buffers afresh: about
    # 256 faults each, four buffers a round, 40 rounds. Pinned, the heap serves them.
    assert default > 40 * 256, default
    assert pinned < default / 10, (pinned, default)


@pytest.mark.parametrize("name", ADMIN_VARIABLES)
def test_an_administrators_malloc_setting_is_left_alone(name: str) -> None:
    assert pin_thresholds({name: "1048576"}) is False


def test_without_the_administrators_settings_both_thresholds_are_set() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the thresholds are glibc's; this machine's C library is another")
    assert pin_thresholds({"PATH": "/usr/bin"}) is True
