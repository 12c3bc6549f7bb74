"""Run records: which flow runs are at work on a store, so that a later run can tell the crashed ones.

A run writes ``<store>/runs/<flow run id>.json`` when it starts, before it reads its source
(:func:`record_run`), and removes it when it ends, however it ends inside Python (success, error,
Ctrl-C). A record that outlives
its process is a run that was killed (``kill -9``, the out-of-memory killer, a reboot) and so never
closed its Prefect flow and task runs or its MLflow run: they would show "Running" forever.
:func:`crashed_runs` finds those records; closing the runs is the caller's (``tasks.crashes``).

A record's process is gone when the record is from this host and its pid is not alive, or is alive
with another start time (the pid was reused). Records of other hosts are left alone: whether their
process lives cannot be told from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import asdict, dataclass

import psutil
from fsspec.implementations.local import LocalFileSystem

from dq_ops.store import Store
from dq_ops.urls import filesystem

RUNS = "runs"
# psutil derives a start time from the boot time and clock ticks: equal within this for one process.
_START_TOLERANCE_S = 1.0
_WRITE_ATTEMPTS = 3


@dataclass(frozen=True)
class RunRecord:
    """One run at work on a store: its Prefect flow run, its name, and the process running it."""

    flow_run_id: str
    run: str
    host: str
    pid: int
    started: float  # the process's start time, seconds since the epoch

    def process_gone(self) -> bool:
        """Whether this run's process has ended (records of other hosts: never known, False)."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.started) > _START_TOLERANCE_S
        except psutil.NoSuchProcess:
            return True


def _folder(store: Store) -> str:
    _, root = filesystem(store.url, store.storage_options)
    return f"{root.rstrip('/')}/{RUNS}"


def record_run(store: Store, flow_run_id: str, run: str) -> RunRecord:
    """Write the record of the calling process's run (see the module docstring)."""
    record = RunRecord(flow_run_id, run, socket.gethostname(), os.getpid(), psutil.Process().create_time())
    folder, path = _folder(store), f"{_folder(store)}/{flow_run_id}.json"
    with store.writing():  # the run's first write: a full or read-only store is named here
        try:
            for attempt in range(_WRITE_ATTEMPTS):
                store.fs.makedirs(folder, exist_ok=True)
                try:
                    store.fs.pipe_file(path, json.dumps(asdict(record)).encode())
                    break
                except FileNotFoundError:  # another run that ended removed the folder, empty, in between
                    if attempt == _WRITE_ATTEMPTS - 1:
                        raise
        except OSError:  # a full disk: no half-written record, the store as it was
            if store.fs.exists(path):
                store.fs.rm(path)
            _remove_if_empty(store, folder)
            raise
    return record


def remove_run_record(store: Store, flow_run_id: str) -> None:
    """Forget a run: it ended, or its crash was dealt with. The folder goes when it is left empty,
    so a run stopped by its input or its settings leaves the store as it found it."""
    folder = _folder(store)
    path = f"{folder}/{flow_run_id}.json"
    if store.fs.exists(path):
        store.fs.rm(path)
    _remove_if_empty(store, folder)


def _remove_if_empty(store: Store, folder: str) -> None:
    """Remove a local store's ``runs`` folder when it holds nothing (object stores have no folders)."""
    if isinstance(store.fs, LocalFileSystem):
        with contextlib.suppress(OSError):  # not empty (another run at work), or already gone
            os.rmdir(folder)


def crashed_runs(store: Store) -> list[RunRecord]:
    """The recorded runs of this host whose process is gone, oldest first."""
    folder = _folder(store)
    if not store.fs.exists(folder):
        return []
    records = []
    for path in store.fs.ls(folder, detail=False):
        if path.endswith(".json"):
            try:
                records.append(RunRecord(**json.loads(store.fs.cat_file(path))))
            except FileNotFoundError:  # its run ended, or another run closed it, since the listing
                continue
            except json.JSONDecodeError:  # being written right now (its run is alive)
                continue
    return sorted((r for r in records if r.process_gone()), key=lambda r: r.started)
