"""What a ``dq`` command shows on the terminal, and where the rest goes.

The promise: a failed command ends with one line ``error: <what> (details: <log file>)`` and
exit status 2, a Ctrl-C with one line ``interrupted`` and status 130, and no traceback on the
terminal, whoever raised it (dq, Prefect's task engine, a dask worker process, the temporary
Prefect server). To keep it without silencing anything:

* Every command writes a log file (URL passwords redacted) (``$DQ_LOG_DIR``, else ``$XDG_CACHE_HOME/dq/logs``, else
  ``~/.cache/dq/logs``; the newest :data:`KEEP_LOGS` are kept) with every log record at INFO
  and above, tracebacks included.
* File descriptor 2 is pointed at that log file, so child processes (dask workers, Prefect's
  temporary server) and anything printing to ``sys.stderr`` write there. The terminal, a
  duplicate of the original stderr, shows the work (:class:`StageDisplay`): one line per stage
  task (its name, computed or cached, its time), a bar with counts and ETA for each stage at work
  (``tasks.progress`` events), Prefect's other flow- and task-run records below ERROR without
  tracebacks, and dq's messages. On a terminal the bars are live; when stdout or stderr is not a
  terminal, plain lines (no control characters; a progress line per stage every
  ``$DQ_PROGRESS_INTERVAL_S`` seconds, default :data:`PLAIN_INTERVAL_S`); quiet (``-q``):
  warnings only, then the command's summary or error.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, TextIO

from dq_ops.progress import Progress
from dq_ops.urls import redact_credentials
from tasks.progress import LOGGER as STAGE_LOGGER

KEEP_LOGS = 50
INTERRUPT_GRACE_S = 5.0
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
# Loggers whose records the terminal shows (below ERROR, without tracebacks): the run's progress.
TERMINAL_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "dq_ops")  # dq_ops: damage found and repaired
PLAIN_INTERVAL_S = 10.0  # plain mode: at most one progress line per stage this often (DQ_PROGRESS_INTERVAL_S)
FINISHED = "Finished in state "  # how Prefect's task engine ends every task run's log
STATUS = {"Completed": "computed", "Cached": "cached"}  # Prefect's final state name → what the stage did
DisplayMode = Literal["live", "plain", "quiet"]


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


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StageDisplay(logging.Handler):
    """The terminal of a ``dq`` command: stage lines, progress bars and the run's messages.

    A logging handler, so that it sees what the run reports from any thread: ``tasks.progress``
    events (a stage task started, advanced) and Prefect's ``Finished in state …`` record of each
    task run, which becomes the stage's line (``Cached`` → cached, ``Completed`` → computed;
    failures stay in the log file, the command ends with its ``error:`` line). ``live`` draws
    bars with rich (counts, elapsed, ETA); ``plain`` writes a progress line per stage at most every
    ``interval_s``; ``quiet`` shows warnings only.
    """

    def __init__(self, terminal: TextIO, mode: DisplayMode, interval_s: float = PLAIN_INTERVAL_S):
        super().__init__()
        self.terminal, self.mode, self.interval_s = terminal, mode, interval_s
        self.setFormatter(_Redacting("%(asctime)s | %(message)s", "%H:%M:%S"))
        self._started: dict[str, float] = {}  # task run id → when its stage started (time.time())
        self._reported: dict[str, float] = {}  # plain: task run id → last progress line
        self._first: dict[str, tuple[float, int]] = {}  # plain: task run id → (when, done) of its first report
        self._bars: dict[str, int] = {}  # live: task run id → rich task
        self._live = None
        if mode == "live":
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._rich = RichConsole(file=terminal, highlight=False, soft_wrap=True)
            self._live = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("ETA"), TimeRemainingColumn(), console=self._rich, transient=True,
                redirect_stdout=False, redirect_stderr=False, refresh_per_second=2,
            )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = getattr(record, "dq_event", None)
            if event == "start":
                self._started.setdefault(record.dq_run, record.created)
            elif event == "progress":
                self.advance(record.dq_run, record.dq_stage, record.dq_done, record.dq_total)
            elif hasattr(record, "task_run_id") and record.getMessage().startswith(FINISHED):
                self._finished(record)
            elif _PROGRESS_ONLY.filter(record) and (self.mode != "quiet" or record.levelno >= logging.WARNING):
                # say whose: a task run's other records (retries), the flow run's end
                owner = getattr(record, "task_run_name", None) or (
                    getattr(record, "flow_run_name", None) if record.getMessage().startswith(FINISHED) else None)
                self.line(self.format(record).replace(" | ", f" | {owner}: ", 1) if owner else self.format(record))
        except Exception:
            self.handleError(record)

    def _finished(self, record: logging.LogRecord) -> None:
        started = self._started.get(record.task_run_id)
        self.drop(record.task_run_id)
        if record.levelno >= logging.ERROR or self.mode == "quiet":
            return
        state = record.getMessage().removeprefix(FINISHED).split("(")[0]
        took = "" if started is None else f"{record.created - started:8.1f} s"
        self.line(f"{self.formatter.formatTime(record, '%H:%M:%S')} | {record.task_run_name:<40} {STATUS.get(state, state):<8}{took}")

    def advance(self, key: str, name: str, done: int, total: int) -> None:
        """``done`` of ``total`` for the stage ``key`` (a task run id): its bar, or a plain line."""
        with self.lock:
            now = time.time()
            started = self._started.setdefault(key, now)
            if self.mode == "live":
                if key not in self._bars:
                    if not self._bars:
                        self._live.start()
                    self._bars[key] = self._live.add_task(name, total=total, completed=done)
                    self._live.refresh()  # drawn now: a stage shorter than a refresh interval shows its bar too
                else:
                    self._live.update(self._bars[key], completed=done, total=total)
            elif self.mode == "plain":
                # the rate since the first report: a worker's start-up is not part of it
                first_at, first_done = self._first.setdefault(key, (now, done))
                if done >= total or now - self._reported.get(key, started) < self.interval_s:
                    return
                self._reported[key] = now
                eta = f"ETA {_clock((now - first_at) / (done - first_done) * (total - done))}" if done > first_done else "ETA ?"
                self.line(f"{time.strftime('%H:%M:%S')} | {name:<40} {done:,}/{total:,} ({done / max(total, 1):.0%}), "
                          f"{_clock(now - started)} elapsed, {eta}")

    def drop(self, key: str) -> None:
        """The stage ``key`` ended: its bar goes (and the live display when it was the last)."""
        with self.lock:
            self._started.pop(key, None)
            self._reported.pop(key, None)
            self._first.pop(key, None)
            bar = self._bars.pop(key, None)
            if bar is not None:
                self._live.remove_task(bar)
                if not self._bars:
                    self._live.stop()

    def line(self, text: str) -> None:
        """One line, above the bars while they are live."""
        with self.lock:
            if self._bars:
                self._rich.print(text, markup=False)
            else:
                print(text, file=self.terminal, flush=True)

    def close(self) -> None:
        """Stop the bars (the cursor comes back) before the command's last line or exit."""
        with self.lock:
            for key in list(self._bars):
                self.drop(key)
        super().close()


_PROGRESS_ONLY = _ProgressOnly()


class _Redacting(logging.Formatter):
    """Formats a record (traceback included) with URL passwords replaced by ``***``."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_credentials(super().format(record))


class Console:
    """One command's terminal and log file; :meth:`open` sets both up for the whole process."""

    def __init__(self, terminal: TextIO, log_path: Path, display: StageDisplay):
        self.terminal = terminal
        self.log_path = log_path
        self.display = display
        self.logger = logging.getLogger("dq.cli")
        self._final_line_written = threading.Lock()
        self._interrupts = 0

    @classmethod
    def open(cls, command: str, quiet: bool = False) -> Console:
        """Log file and terminal for ``command``; ``quiet``: warnings, summary and errors only."""
        interval = _progress_interval()  # while stderr is still the terminal
        path = _new_log_file(command)
        terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(log_fd, 2)  # children and C libraries inherit fd 2: their output goes to the log
        os.close(log_fd)
        sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)

        root = logging.getLogger()
        root.setLevel(logging.INFO)
        to_log = logging.StreamHandler(sys.stderr)
        to_log.setLevel(logging.INFO)  # not the display's DEBUG progress events
        to_log.setFormatter(_Redacting("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
        mode: DisplayMode = "quiet" if quiet else "live" if terminal.isatty() and sys.stdout.isatty() else "plain"
        display = StageDisplay(terminal, mode, interval)
        if not quiet:
            logging.getLogger(STAGE_LOGGER).setLevel(logging.DEBUG)
        root.handlers[:] = [to_log, display]
        console = cls(terminal, path, display)
        console.logger.info("dq %s (pid %d): %s", command, os.getpid(), " ".join(sys.argv))
        return console

    @contextmanager
    def progress(self, name: str) -> Iterator[Progress]:
        """A ``progress(done, total)`` callback for work outside a flow (``dq ingest``, ``dq export``):
        the same bar or plain lines as a stage's, gone when the block ends."""
        key = f"{name}-{time.monotonic_ns()}"
        try:
            yield lambda done, total: self.display.advance(key, name, done, total)
        finally:
            self.display.drop(key)

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
            self.display.close()
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


def _progress_interval() -> float:
    """``$DQ_PROGRESS_INTERVAL_S`` (plain mode's seconds between a stage's progress lines); bad: exit 2."""
    value = os.environ.get("DQ_PROGRESS_INTERVAL_S", "")
    try:
        return float(value) if value else PLAIN_INTERVAL_S
    except ValueError:
        print(f"error: DQ_PROGRESS_INTERVAL_S={value!r} is not a number of seconds", file=sys.stderr)
        raise SystemExit(EXIT_INPUT_ERROR) from None


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
