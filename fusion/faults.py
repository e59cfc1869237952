"""Named fault points for the crash tests.

``ADAFUSE_FAULT=<point>`` (or ``<point>:<n>``) makes this process SIGKILL itself the first (or n-th) time
it reaches ``fault_point("<point>")``: the tests kill a run at an exact place (mid-epoch, inside a file
write, ...) and check that re-running the command completes it. Unset, a fault point does nothing.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("ADAFUSE_FAULT")
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if not nth.isdigit():  # "write:last.ckpt" names a point; "write:last.ckpt:2" its second hit
        point, nth = spec, "1"
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
