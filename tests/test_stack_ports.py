"""The local stack starts safely: taken ports stop it before anything starts, ports move by the env
file, every process it starts listens on loopback, and readiness counts only its own processes.

Real processes on free loopback ports: a dask scheduler and worker started by ``infra/stack.sh``
(the stack's services that need no database), a foreign HTTP server standing in for another
Prefect server, and ``infra/servers.sh`` refusing a taken port.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from threading import Thread

import pytest

from infra import services
from tests.cli_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
DASK = ["--services", "dask-scheduler", "dask-worker", "--no-deploy"]


def _env_file(path: Path, **ports: int) -> Path:
    """An env file with fresh secrets and the given port settings (``DQ_DASK_PORT=...``)."""
    values = dict.fromkeys(services.SETTINGS, "") | {
        "DQ_POSTGRES_USER": "dq", "DQ_POSTGRES_PASSWORD": secrets.token_urlsafe(16), "DQ_PREFECT_AUTH": "admin:x",
        "DQ_MLFLOW_USER": "admin", "DQ_MLFLOW_PASSWORD": secrets.token_urlsafe(16), "DQ_S3_BUCKET": "dq-data",
    } | {name: str(port) for name, port in ports.items()}
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


class _Healthy(BaseHTTPRequestHandler):
    """Another server: 200 on every path, as a Prefect server's /api/health would."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def foreign_server():
    """An HTTP server on a loopback port that is not ours; yields its port."""
    server = HTTPServer(("127.0.0.1", 0), _Healthy)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_taken_port_stops_the_stack_before_anything_starts(tmp_path, foreign_server):
    env_file = _env_file(tmp_path / "dq.env", DQ_DASK_PORT=foreign_server)
    done = subprocess.run(["bash", "infra/stack.sh", "--env-file", str(env_file), "--state-dir", str(tmp_path / "state"), *DASK],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"error: port {foreign_server} (dask-scheduler) is in use on 127.0.0.1: stop what listens "
                                   "there, or set DQ_DASK_PORT in the env file to another port")
    assert not (tmp_path / "state").exists()  # nothing started, no logs written


def test_the_stack_listens_on_loopback_only_on_the_ports_of_the_env_file(tmp_path):
    scheduler, dashboard = free_port(), free_port()
    env_file = _env_file(tmp_path / "dq.env", DQ_DASK_PORT=scheduler, DQ_DASK_DASHBOARD_PORT=dashboard)
    stack = subprocess.Popen(["bash", "infra/stack.sh", "--env-file", str(env_file), "--state-dir", str(tmp_path / "state"), *DASK],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        first = stack.stdout.readline()  # printed once every service is ready (its own readiness deadline: 180 s)
        assert f"dask tcp://127.0.0.1:{scheduler} (dashboard http://127.0.0.1:{dashboard})" in first, stack.stderr.read()
        assert "Prefect UI" not in first and "MLflow UI" not in first  # only what started is named
        deadline = time.monotonic() + 120
        while len(listening := services.listening(stack.pid)) < 5:  # the worker process starts after its nanny
            assert time.monotonic() < deadline and stack.poll() is None, listening
            time.sleep(0.5)
        # the scheduler and its dashboard on the env file's ports; the nanny, the worker and its dashboard
        assert {("127.0.0.1", scheduler), ("127.0.0.1", dashboard)} <= listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, listening
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(timeout=60)
    assert stack.returncode == 0


def test_readiness_counts_only_the_process_the_stack_started(tmp_path, foreign_server):
    """Another healthy server on the port (what passed for a stack's own Prefect server) is not ready."""
    url = f"http://127.0.0.1:{foreign_server}/api/health"
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # alive, listens nowhere
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"prefect-server not listening on 127.0.0.1:{foreign_server} after 2 s; see x.log"):
            services.wait_ready("prefect-server", idle.pid, "127.0.0.1", foreign_server, url, "x.log", timeout=2)
        assert time.monotonic() - started < 30
    finally:
        idle.kill()
        idle.wait()
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    exited.wait()
    with pytest.raises(RuntimeError, match="prefect-server exited before it was ready; see x.log"):
        services.wait_ready("prefect-server", exited.pid, "127.0.0.1", foreign_server, url, "x.log", timeout=60)
    # and the process that does listen there is ready
    ours = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        services.wait_ready("http", ours.pid, "127.0.0.1", port, f"http://127.0.0.1:{port}/", "x.log", timeout=60)
    finally:
        ours.kill()
        ours.wait()


def test_servers_sh_refuses_a_taken_port_and_starts_nothing(tmp_path, foreign_server):
    env = dict(os.environ, DQ_PREFECT_PORT=str(foreign_server), DQ_MLFLOW_PORT=str(free_port()))
    done = subprocess.run(["bash", "infra/servers.sh", str(tmp_path / "store")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(rf"error: port {foreign_server} \(Prefect server\) is in use on 127.0.0.1: .*set DQ_PREFECT_PORT\n",
                        done.stderr), done.stderr
    assert "UI:" not in done.stdout and not (tmp_path / "store").exists()


def test_env_file_ports_are_checked_and_move_only_their_service(tmp_path):
    with pytest.raises(ValueError, match=r"dq.env: DQ_MLFLOW_PORT='50o0' is not a port number \(1-65535\)"):
        services.read_env_file(_env_file(tmp_path / "dq.env", DQ_MLFLOW_PORT="50o0"))
    ports = services.local_ports(services.read_env_file(_env_file(tmp_path / "dq.env", DQ_MLFLOW_PORT=15000)))
    assert ports == services.PORTS | {"mlflow-server": 15000}
    with socket.socket() as sock:  # a listener on every interface takes the port on loopback too
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        topology = services.Topology({}, ports=services.PORTS | {"mlflow-server": sock.getsockname()[1]})
        with pytest.raises(services.PortInUseError, match="DQ_MLFLOW_PORT"):
            services.check_ports_free(topology, ["mlflow-server"])
