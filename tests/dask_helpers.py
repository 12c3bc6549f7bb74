"""What tests that interrupt dask work share."""

from __future__ import annotations

import time

from distributed import Client


class Interrupted(Exception):
    """Raised from a progress callback to stop a stage mid-way, as a crash would."""


def wait_until_idle(client: Client, timeout: float = 120.0) -> None:
    """Wait for tasks that were already running when their futures were cancelled."""
    deadline = time.monotonic() + timeout
    while any(client.run(lambda dask_worker: dask_worker.state.executing_count).values()):
        assert time.monotonic() < deadline, "workers still busy"
        time.sleep(0.1)
