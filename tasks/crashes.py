"""Closing what killed runs left open: a run whose process is gone (``dq_ops.runs``) gets its Prefect
flow run and unfinished task runs marked Crashed and its MLflow runs FAILED, so that no killed run
shows "Running" forever. Every run does this for its store when it starts."""

from __future__ import annotations

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from dq_ops.runs import RunRecord, crashed_runs, remove_run_record
from dq_ops.store import Store
from tasks.tracking import Tracker

_PAGE = 200  # the Prefect API's largest page


def close_crashed_runs(store: Store, tracker: Tracker) -> str | None:
    """Close the runs of ``store`` whose process is gone and forget their records; the one line
    that says what was closed, or None when nothing was left open."""
    with store.lock("runs", "crashed"):  # runs starting together: one of them closes each crashed run
        crashed = crashed_runs(store)
        if not crashed:
            return None
        with get_client(sync_client=True) as client:
            in_prefect = {record.flow_run_id: _crash_in_prefect(client, record) for record in crashed}
        in_mlflow = {record.flow_run_id: tracker.fail_crashed([record.flow_run_id]) for record in crashed}
        for record in crashed:
            remove_run_record(store, record.flow_run_id)
    closed = [r for r in crashed if in_prefect[r.flow_run_id] or in_mlflow[r.flow_run_id]]  # a Ctrl-C closed its own
    if not closed:
        return None
    return (f"closed {len(closed)} run(s) of this store whose process was killed: "
            + "; ".join(f"{r.run} (pid {r.pid}, flow run {r.flow_run_id}): {in_prefect[r.flow_run_id]} Prefect run(s) "
                        f"marked Crashed, {in_mlflow[r.flow_run_id]} MLflow run(s) marked FAILED" for r in closed))


def _crash_in_prefect(client: SyncPrefectClient, record: RunRecord) -> int:
    """Mark Crashed the flow run and its task runs that are not in a final state; their count
    (0 when the flow run is not on this Prefect server)."""
    try:
        flow_run = client.read_flow_run(record.flow_run_id)
    except ObjectNotFound:
        return 0
    message = f"its process (pid {record.pid} on {record.host}) ended without closing it"
    open_runs = [run for run in _task_runs(client, record.flow_run_id) if not run.state or not run.state.is_final()]
    for run in open_runs:
        client.set_task_run_state(run.id, Crashed(message=f"Task run crashed: {message}"), force=True)
    flow_open = not flow_run.state or not flow_run.state.is_final()
    if flow_open:
        client.set_flow_run_state(flow_run.id, Crashed(message=f"Flow run crashed: {message}"), force=True)
    return len(open_runs) + flow_open


def _task_runs(client: SyncPrefectClient, flow_run_id: str) -> list[TaskRun]:
    runs: list[TaskRun] = []
    while True:
        page = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     limit=_PAGE, offset=len(runs))
        runs += page
        if len(page) < _PAGE:
            return runs
