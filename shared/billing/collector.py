"""The cyclic garbage collector in a warm execution environment (Lambda's module init, the runner's start)."""

from __future__ import annotations

import gc

# CPython runs a young-generation collection every 700 net allocations of container objects (its
# default gc.get_threshold()[0]). A bill allocates thousands and reference counting frees nearly all of
# them, so those collections find almost nothing, yet they were 4-5 % of a bill's event-loop CPU and
# promote whatever is in flight into the older generations, whose collections scan more
# (bench/profile.py). At 10,000 a collection runs every few bills: 0.06 ms of a bill's CPU against 0.3 ms
# at 700. At 50,000 (0.02 ms) a warm environment's RSS grew 9-10.5 MB over 1,000 invocations against
# 4.3 MB at 10,000 (bench section cost, target <= 10 MB): cyclic garbage waited too long.
YOUNG_THRESHOLD = 10_000


def settle_after_init() -> None:
    """Freeze what is alive now (settings, clients, pools, the agent: it lives as long as the process,
    so no full collection need scan it again) and collect the young generation less often."""
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
