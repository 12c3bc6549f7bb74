"""The local Prefect server `dq run` keeps (flows/server.py), started for real on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.cli_helpers import REPO, free_port

USE_LOCAL_SERVER = "from flows.server import use_local_server; print(use_local_server())"


def _local_server_env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DQ_PREFECT_SERVER", "PREFECT_API_URL")}
    return env | {"PREFECT_HOME": str(home), "PREFECT_SERVER_API_PORT": str(port), "PYTHONPATH": str(REPO)}


def test_a_stale_pid_file_does_not_block_the_local_server(tmp_path):
    """A background server that died uncleanly (a reboot, a killed machine) leaves
    ``$PREFECT_HOME/server.pid`` behind, and ``prefect server start --background`` then refuses
    to start; dq removes the stale file and starts its server."""
    home, port = tmp_path / "prefect-home", free_port()
    home.mkdir()
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    (home / "server.pid").write_text(str(finished.pid))
    env = _local_server_env(home, port)
    try:
        started = subprocess.run([sys.executable, "-c", USE_LOCAL_SERVER], env=env, cwd=REPO,
                                 capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"http://127.0.0.1:{port}/api"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as response:
            assert response.status == 200
        assert int((home / "server.pid").read_text()) != finished.pid
    finally:
        subprocess.run([sys.executable, "-m", "prefect", "server", "stop"], env=env, cwd=REPO,
                       capture_output=True, timeout=120)


def test_a_port_taken_by_something_else_fails_at_once_naming_it(tmp_path):
    """Prefect refuses a port another program holds; dq reports that in one line instead of
    waiting for a server that will never answer."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))  # bound, not listening: no HTTP answer, and not free
        port = squatter.getsockname()[1]
        failed = subprocess.run([sys.executable, "-c", USE_LOCAL_SERVER], env=_local_server_env(home, port),
                                cwd=REPO, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    error = failed.stderr.strip().splitlines()[-1]
    assert f"could not start a Prefect server on 127.0.0.1:{port}" in error and "already in use" in error
