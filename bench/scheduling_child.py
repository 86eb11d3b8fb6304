"""One strategy of bench.scheduling in a process of its own: ``python -m bench.scheduling_child JSON``.

Run by bench.scheduling.run_once; prints the run (bench.scheduling.Run) as one JSON document. The
parent holds the local stack (PostgreSQL, moto, and the marketplace emulators, served from threads of
its process) and prepares the database and the queue; this process runs only the measured event loop,
as the biller does (a real marketplace is not in its process), so no emulator's Python holds its GIL.
The environment (the stack's endpoints, QUIET_ENV, UNPACED_ENV) is the parent's.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict


def main(argv: list[str]) -> None:
    from bench.scheduling import Params, measure

    job = json.loads(argv[0])
    p = Params(**job["params"])
    client = None
    if p.apm:
        from billing_local.local_run import local_apm_client

        client = local_apm_client()
    run = asyncio.run(
        measure(job["strategy"], p, job["dsn"], job["queue_url"], job["latency"], client, servers=True)
    )
    print(json.dumps(asdict(run)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
