"""What a run says while it works: a stage task started, a stage task advanced (``done`` of ``total``).

Both are DEBUG records on the :data:`LOGGER` logger with the event in attributes (``dq_event``,
``dq_run``: the task run id, ``dq_stage``: its name, ``dq_done``, ``dq_total``). No Prefect import
here, so the ``dq`` terminal (``flows.console``) can listen before Prefect loads; and wherever no one
lowers that logger's level (a Prefect worker, a served deployment) they cost one level check.
"""

from __future__ import annotations

import logging

LOGGER = "dq.stages"
_log = logging.getLogger(LOGGER)


def stage_started(run_id: str, name: str) -> None:
    """A stage task began (cached or not): the display's clock for it starts here."""
    _log.debug("%s started", name, extra={"dq_event": "start", "dq_run": run_id, "dq_stage": name})


def stage_advanced(run_id: str, name: str, done: int, total: int) -> None:
    """``done`` of ``total`` units of a stage task are finished (rows, chunks, training steps)."""
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s %d/%d", name, done, total,
                   extra={"dq_event": "progress", "dq_run": run_id, "dq_stage": name, "dq_done": done, "dq_total": total})
