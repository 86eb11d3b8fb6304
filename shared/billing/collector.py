"""The cyclic garbage collector in a warm execution environment (Lambda's module init, the runner's start)."""

from __future__ import annotations

import gc

# CPython runs a young-generation collection every 700 net allocations of container objects (its
# default gc.get_threshold()[0]). A bill allocates thousands and reference counting frees nearly all of
# them, so those collections find almost nothing, yet they were 4-5 % of a bill's event-loop CPU and
# promote whatever is in flight into the older generations, whose collections scan more
# (bench/profile.py). At 50,000 a collection runs every few dozen bills; what cyclic garbage waits
# for it is a few megabytes at most.
YOUNG_THRESHOLD = 50_000


def settle_after_init() -> None:
    """Freeze what is alive now (settings, clients, pools, the agent: it lives as long as the process,
    so no full collection need scan it again) and collect the young generation less often."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
