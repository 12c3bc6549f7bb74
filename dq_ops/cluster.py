"""The executor: the one place that turns a :class:`~dq_ops.config.ClusterConfig` into a dask client.

- ``kind="local"``: a CPU ``distributed.LocalCluster`` of worker *processes* (models and torch's
  thread pools are per process; dask starts workers with ``OMP_NUM_THREADS=1``, so a worker runs
  ``threads_per_worker`` single-threaded tasks side by side).
- ``kind="local-cuda"``: ``dask_cuda.LocalCUDACluster``, one worker per visible GPU (the ``gpu``
  extra: ``pip install 'dq[gpu]'``).
- ``kind="auto"``: ``local-cuda`` when dask-cuda imports and sees a GPU, else ``local``.
- ``kind="address"``: connect to a running scheduler; the cluster outlives the client.

Local workers keep glibc's default malloc tuning instead of dask's ``MALLOC_TRIM_THRESHOLD_=65536``
(unless the environment sets it): any explicit value also turns off glibc's adaptive mmap
threshold, so torch's large per-layer buffers are mmap'd and page-faulted afresh on every batch,
which made embedding markedly slower when measured (docs/benchmarks.md). The cost: freed memory
goes back to the OS less eagerly.
A remote cluster (``kind="address"``) keeps whatever its operator configured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from dq_ops.config import ClusterConfig
from dq_ops.errors import DQInputError

if TYPE_CHECKING:  # imported where a cluster starts: distributed is slow to import
    from distributed import Client

ClusterKind = Literal["local", "local-cuda", "address"]
CONNECT_TIMEOUT_S = 5.0  # a scheduler's TCP port accepts at once; longer means a dead host or a firewall
SCHEDULER_TIMEOUT_S = 30.0  # the scheduler's reply to a handshake
WORKERS_TIMEOUT_S = 120.0  # a cluster that scales up may take a while to start its first worker
# A random dashboard port (several clusters may run on one shared machine), on loopback like the
# scheduler and workers of a local cluster (dask's ":0" would listen on every interface).
LOCAL_DASHBOARD = "127.0.0.1:0"


def _visible_gpus() -> int:
    """GPUs dask-cuda would use, or 0 when dask-cuda is not installed or finds no GPU driver."""
    try:
        from dask_cuda.utils import get_n_gpus
    except ImportError:
        return 0
    try:
        return get_n_gpus()
    except Exception:  # pynvml raises NVMLError subclasses when there is no driver/library
        return 0


def resolve_kind(config: ClusterConfig) -> ClusterKind:
    """The concrete cluster ``config`` asks for (``auto`` decided by what this machine has)."""
    if config.kind == "auto":
        return "local-cuda" if _visible_gpus() > 0 else "local"
    return config.kind


def cluster_precision(config: ClusterConfig) -> str:
    """The numeric precision image extractors compute in on this cluster (it changes features,
    so it enters embedding keys): float32 on CPU workers, bf16/fp16 autocast on CUDA workers.
    A remote scheduler is asked (connecting starts nothing); mixed clusters list every precision."""
    kind = resolve_kind(config)
    if kind == "local":
        return "float32"
    if kind == "local-cuda":
        import torch

        from dq_ops.backbones import inference_precision

        return inference_precision(torch.device("cuda"))
    with dask_client(config) as client:
        return workers_precision(client)


def workers_precision(client: Client, timeout: float | None = None) -> str:
    """The precision a running cluster's workers compute in; mixed clusters list every precision.

    A scheduler without workers would keep the run waiting without end: after ``timeout``
    seconds (default :data:`WORKERS_TIMEOUT_S`) that is an error naming the scheduler."""
    timeout = WORKERS_TIMEOUT_S if timeout is None else timeout
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise DQInputError(
            f"cluster.address {client.scheduler.address}: the dask scheduler there has no workers "
            f"(none joined within {timeout:g} s)"
        ) from None
    return "+".join(sorted(set(client.run(_worker_precision).values())))


def _worker_precision() -> str:
    """Worker side of :func:`workers_precision`: torch is imported there, never in the flow process."""
    from dq_ops.backbones import inference_precision

    return inference_precision()


def check_scheduler(address: str | None) -> None:
    """A dask scheduler must answer at ``address``: accept a TCP connection within
    :data:`CONNECT_TIMEOUT_S`, then tell who it is within :data:`SCHEDULER_TIMEOUT_S`.

    distributed's ``Client`` waits without end on a listener that accepts connections and never
    replies (an HTTP port, a stalled proxy), whatever its own ``timeout``; this handshake is
    bounded, so such an address fails in bounded time with an error naming it.
    """
    import asyncio
    import socket
    from concurrent.futures import ThreadPoolExecutor

    parts = urlsplit(address if "://" in str(address) else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise DQInputError(f"cluster.address {address!r}: expected tcp://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise DQInputError(f"cluster.address {address}: no dask scheduler reachable ({reason})") from None

    async def identity() -> object:
        from distributed.comm import connect

        comm = await connect(f"{parts.scheme}://{host}:{port}", timeout=SCHEDULER_TIMEOUT_S)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    # Its own thread and event loop: the caller may be inside one (a Prefect flow).
    with ThreadPoolExecutor(1) as thread:
        try:
            answer = thread.submit(asyncio.run, asyncio.wait_for(identity(), SCHEDULER_TIMEOUT_S)).result()
        except TimeoutError:
            raise DQInputError(
                f"cluster.address {address}: no dask scheduler answered within {SCHEDULER_TIMEOUT_S:g} s "
                "(the port accepts connections but nothing replied)"
            ) from None
        except OSError as exc:
            raise DQInputError(f"cluster.address {address}: no dask scheduler answered ({exc})") from None
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        raise DQInputError(f"cluster.address {address}: the listener there is not a dask scheduler")


@contextmanager
def dask_client(config: ClusterConfig) -> Iterator[Client]:
    """A ``distributed.Client`` for ``config``; a cluster started here is closed on exit.

    ``n_workers`` / ``threads_per_worker`` left unset take dask's defaults (local: about one
    worker per core group; local-cuda: one worker per GPU, one thread each).
    """
    import dask
    from distributed import Client, LocalCluster

    kind = resolve_kind(config)
    if kind == "address":
        check_scheduler(config.address)
        with Client(config.address) as client:
            yield client
        return
    sizes = {
        key: value
        for key, value in (("n_workers", config.n_workers), ("threads_per_worker", config.threads_per_worker))
        if value is not None
    }
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        if kind == "local-cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError as exc:
                raise DQInputError(
                    f"cluster.kind='local-cuda' needs dask-cuda (pip install 'dq[gpu]'): {exc}"
                ) from None
            cluster = LocalCUDACluster(dashboard_address=LOCAL_DASHBOARD, **sizes)
        else:
            cluster = LocalCluster(processes=True, dashboard_address=LOCAL_DASHBOARD, **sizes)
    with cluster, Client(cluster) as client:
        yield client
