"""What a ``dq`` command shows on the terminal, and where the rest goes.

The promise: a failed command ends with one line ``error: <what> (details: <log file>)`` and
exit status 2, a Ctrl-C with one line ``interrupted`` and status 130, and no traceback on the
terminal, whoever raised it (dq, Prefect's task engine, a dask worker process, the temporary
Prefect server). To keep it without silencing anything:

* Every command writes a log file (URL passwords redacted) (``$DQ_LOG_DIR``, else ``$XDG_CACHE_HOME/dq/logs``, else
  ``~/.cache/dq/logs``; the newest :data:`KEEP_LOGS` are kept) with every log record at INFO
  and above, tracebacks included.
* File descriptor 2 is pointed at that log file, so child processes (dask workers, Prefect's
  temporary server) and anything printing to ``sys.stderr`` write there. The terminal keeps
  the run's own progress lines (Prefect's flow- and task-run records below ERROR, without
  tracebacks) and dq's messages, written to a duplicate of the original stderr.
* The root logger gets these handlers *before* Prefect is imported; Prefect then leaves the root
  logger alone (it only installs its console handler when the root logger has no handlers of
  the user's).
* SIGINT raises ``KeyboardInterrupt`` so that cleanup runs (failed MLflow run, dask clusters
  closed, staging removed), but the process is ended after :data:`INTERRUPT_GRACE_S` seconds
  whatever it is doing: Prefect's engine would otherwise retry reporting the crash to a
  temporary server that the same Ctrl-C already stopped, for minutes. A second SIGINT ends it
  at once. Child processes are stopped first.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from dq_ops.urls import redact_credentials

KEEP_LOGS = 50
INTERRUPT_GRACE_S = 5.0
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
# Loggers whose records the terminal shows (below ERROR, without tracebacks): the run's progress.
TERMINAL_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "dq_ops")  # dq_ops: damage found and repaired


def log_dir() -> Path:
    """Where command logs go (see the module docstring)."""
    if os.environ.get("DQ_LOG_DIR"):
        return Path(os.environ["DQ_LOG_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dq" / "logs"


class _ProgressOnly(logging.Filter):
    """Terminal filter: the run's progress records; errors and tracebacks stay in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or record.exc_info or record.stack_info:
            return False
        return any(record.name == name or record.name.startswith(name + ".") for name in TERMINAL_LOGGERS)


class _Redacting(logging.Formatter):
    """Formats a record (traceback included) with URL passwords replaced by ``***``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_credentials(super().format(record))


class Console:
    """One command's terminal and log file; :meth:`open` sets both up for the whole process."""

    def __init__(self, terminal: TextIO, log_path: Path):
        self.terminal = terminal
        self.log_path = log_path
        self.logger = logging.getLogger("dq.cli")
        self._final_line_written = threading.Lock()
        self._interrupts = 0

    @classmethod
    def open(cls, command: str) -> Console:
        path = _new_log_file(command)
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log_fd, 2)  # children and C libraries inherit fd 2: their output goes to the log
        os.close(log_fd)
        sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

        root = logging.getLogger()
        root.setLevel(logging.INFO)
        to_log = logging.StreamHandler(sys.stderr)
        to_log.setFormatter(_Redacting("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        to_terminal = logging.StreamHandler(terminal)
        to_terminal.setFormatter(_Redacting("%(asctime)s | %(message)s", "%H:%M:%S"))
        to_terminal.addFilter(_ProgressOnly())
        root.handlers[:] = [to_log, to_terminal]
        console = cls(terminal, path)
        console.logger.info("dq %s (pid %d): %s", command, os.getpid(), " ".join(sys.argv))
        return console

    # -- endings -------------------------------------------------------------------------------
    def fail(self, message: str) -> int:
        """Log the exception being handled, print the one ``error:`` line, return status 2."""
        self.logger.error("failed: %s", message, exc_info=True)
        one_line = redact_credentials(" ".join(str(message).split()))
        self._final_line(f"error: {one_line} (details: {self.log_path})")
        return EXIT_INPUT_ERROR

    def interrupted(self) -> int:
        self.logger.info("interrupted (SIGINT)")
        self._final_line("interrupted")
        return EXIT_INTERRUPTED

    def _final_line(self, line: str) -> None:
        if self._final_line_written.acquire(blocking=False):  # exactly one last line
            print(line, file=self.terminal, flush=True)

    # -- Ctrl-C ---------------------------------------------------------------------------------
    def handle_interrupts(self) -> None:
        """SIGINT: ``KeyboardInterrupt`` now, a hard exit after the grace period (or a 2nd SIGINT)."""
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            self._hard_exit()
        _daemon_timer(INTERRUPT_GRACE_S, self._hard_exit)
        raise KeyboardInterrupt

    def _hard_exit(self) -> None:
        self.interrupted()
        _stop_children()
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)


def _new_log_file(command: str) -> Path:
    """A fresh log file path; older logs beyond :data:`KEEP_LOGS` are deleted."""
    directory = log_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:  # e.g. a read-only home: fall back to the temporary folder
        import tempfile

        directory = Path(tempfile.gettempdir()) / "dq-logs"
        directory.mkdir(parents=True, exist_ok=True)
    old = sorted(directory.glob("dq-*.log"), key=lambda p: p.stat().st_mtime)
    for stale in old[: max(0, len(old) - KEEP_LOGS + 1)]:
        stale.unlink(missing_ok=True)
    return directory / f"dq-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _daemon_timer(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def _stop_children() -> None:
    """Terminate this process's own child processes (dask workers, a temporary Prefect server)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=2)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass
