"""One dask client per flow run, started by the first task that needs it.

Cached stages never start a cluster; the flow closes whatever was started when it ends. Clients
are entered and closed inside one private ``contextvars.Context``: the first user may be a task
running in the flow's thread pool (concurrent trainings), and a client entered in one context
cannot be exited from another (distributed resets a ContextVar token on exit).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from contextlib import ExitStack
from typing import TYPE_CHECKING

from dq_ops.cluster import dask_client as open_dask_client
from dq_ops.config import ClusterConfig

if TYPE_CHECKING:
    from distributed import Client

    from dq_ops.stage import ClientSource

_lock = threading.Lock()
_clients: dict[str, Client] = {}
_stack = ExitStack()
_context = contextvars.Context()


def dask_client(config: ClusterConfig) -> Client:
    """The process's client for ``config``, started on first use."""
    key = config.model_dump_json()
    with _lock:
        if key not in _clients:
            # Prefect's log handlers would otherwise stream every scheduler/worker INFO line.
            logging.getLogger("distributed").setLevel(logging.WARNING)
            _clients[key] = _context.run(_stack.enter_context, open_dask_client(config))
        return _clients[key]


def cluster_client(config: ClusterConfig | None) -> ClientSource:
    """What a stage runs its work on: nothing without a cluster; the client of the scheduler at
    ``cluster.address``, which runs already (connecting starts nothing), so stages send it even
    small work and the flow process never loads a model; else a function that starts the local
    cluster on first use, so that a stage whose work is done, or small enough to do here, starts none."""
    if config is None:
        return None
    if config.kind == "address":
        return dask_client(config)
    return lambda: dask_client(config)


def close_dask_clients() -> None:
    """Close every client (and the local clusters they started)."""
    with _lock:
        _clients.clear()
        _context.run(_stack.close)
