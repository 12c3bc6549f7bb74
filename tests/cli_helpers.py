"""Running the real ``dq`` CLI in subprocesses: plain pipes, a pseudo-terminal, store snapshots."""

from __future__ import annotations

import hashlib
import os
import pty
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port nothing listens on (the OS's pick, released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test process's environment plus this checkout first on the path, logs under ``tmp_path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["DQ_LOG_DIR"] = str(tmp_path / "logs")
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def log_path(self) -> Path:
        """The log file the ``error:`` line points to."""
        return Path(self.last_line.rsplit("(details: ", 1)[1].rstrip(")"))


def dq(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> Finished:
    """``python -m flows.cli ARGS`` in a subprocess; its exit status and output."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return Finished(proc.returncode, proc.stdout, proc.stderr)


def wait_while_running(proc: subprocess.Popen, done: Callable[[], bool], timeout: float = 600.0, every: float = 0.1) -> None:
    """Poll ``done()`` until it holds; fail if ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"still waiting after {timeout:.0f} s"
        time.sleep(every)


@contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """A real MLflow tracking server on a free loopback port (SQLite and artifacts in ``folder``); its URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (folder / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "no MLflow server after 180 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_in_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run ``args`` with a pseudo-terminal as stdin/stdout/stderr (what an interactive user has)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd)
    os.close(slave)
    output = bytearray()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(master)
    return proc.wait(timeout=60), output.decode(errors="replace")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` by relative path (folders included, empty or not)."""
    if not root.exists():
        return {}
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        digest[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest
