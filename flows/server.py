"""Which Prefect API a local ``dq run`` talks to.

Prefect's default without ``PREFECT_API_URL`` is a temporary server per process, which takes
longer to start on a small machine than a whole re-run of an unchanged dataset, and whose runs
vanish from any UI afterwards. So ``dq run`` keeps one local server instead: it uses
``PREFECT_API_URL`` when set; else a healthy server on ``127.0.0.1:<port>``; else it starts
``prefect server start --background`` there (stopped by ``prefect server stop``) and uses it.
The runs then stay visible in that server's UI. ``DQ_PREFECT_SERVER=ephemeral`` (or ``dq run
--ephemeral-server``) keeps Prefect's temporary per-process server: nothing is left running.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dq_ops.errors import DQInputError

DEFAULT_PORT = 4200
STARTUP_TIMEOUT_S = 180


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _clear_stale_pid_file() -> None:
    """Remove the PID file a dead background server left behind (a reboot, a killed machine):
    ``prefect server start --background`` refuses to start while it exists."""
    pid_file = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser() / "server.pid"
    try:
        pid = int(pid_file.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
    except PermissionError:
        pass  # alive, owned by someone else


def use_local_server(port: int | None = None) -> str | None:
    """Point this process at a local Prefect server, starting one if needed; return its API URL
    (None in ephemeral mode or when ``PREFECT_API_URL`` is already set). Call before Prefect runs."""
    if os.environ.get("PREFECT_API_URL") or os.environ.get("DQ_PREFECT_SERVER") == "ephemeral":
        return None
    port = port or int(os.environ.get("PREFECT_SERVER_API_PORT", DEFAULT_PORT))
    api_url = f"http://127.0.0.1:{port}/api"
    if not _healthy(api_url):
        print(f"starting a local Prefect server on 127.0.0.1:{port} (stop it with: prefect server stop)", file=sys.stderr)
        _clear_stale_pid_file()
        started = subprocess.run(
            [sys.executable, "-m", "prefect", "server", "start", "--background", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True, text=True,
            env=os.environ | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true"},
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(api_url):
            if started.returncode != 0 or time.monotonic() > deadline:
                detail = " ".join((started.stderr or started.stdout).split()) or "no output"
                raise DQInputError(
                    f"could not start a Prefect server on 127.0.0.1:{port} ({detail}); set PREFECT_API_URL, "
                    "PREFECT_SERVER_API_PORT, or DQ_PREFECT_SERVER=ephemeral"
                )
            time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api_url
    return api_url
