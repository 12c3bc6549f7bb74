#!/usr/bin/env bash
# Start the Prefect server and the MLflow UI on loopback for a store, in the background, and say
# which of them started: a URL is printed only once the process started here serves it.
#   bash infra/servers.sh [STORE]        (default ./dq-store)
# Ports: DQ_PREFECT_PORT (default 4200) and DQ_MLFLOW_PORT (default 5000) from the environment; a port
# already in use stops the script before anything starts (exit 2); a server that did not start: exit 1.
# Then: export PREFECT_API_URL=http://127.0.0.1:4200/api so that `dq run` and workers report there.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE="$(realpath -m "${1:-./dq-store}")"
PREFECT_PORT="${DQ_PREFECT_PORT:-4200}"
MLFLOW_PORT="${DQ_MLFLOW_PORT:-5000}"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false

# Another server on one of the ports would answer for ours while ours exits (infra/services.py checks).
.venv/bin/python -c '
import sys
from infra.services import PortInUseError, check_port_free
try:
    check_port_free("127.0.0.1", int(sys.argv[1]), "Prefect server", "set DQ_PREFECT_PORT")
    check_port_free("127.0.0.1", int(sys.argv[2]), "MLflow UI", "set DQ_MLFLOW_PORT")
except (PortInUseError, ValueError) as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
' "$PREFECT_PORT" "$MLFLOW_PORT"

mkdir -p "$STORE" logs
nohup .venv/bin/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT" > logs/prefect-server.log 2>&1 &
PREFECT_PID=$!
# One worker and no job processes keep the MLflow server small (its default starts several).
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup .venv/bin/mlflow ui --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STORE/mlflow.db" > logs/mlflow-ui.log 2>&1 &
MLFLOW_PID=$!

# ready NAME PID PORT HEALTH_PATH LOG: the process started here is alive, listens on the port and is healthy.
ready() {
  .venv/bin/python -c '
import sys
from infra.services import wait_ready
name, pid, port, path, log = sys.argv[1:]
try:
    wait_ready(name, int(pid), "127.0.0.1", int(port), f"http://127.0.0.1:{port}{path}", log, timeout=180)
except (RuntimeError, TimeoutError) as exc:
    print(f"{exc}", file=sys.stderr)
    sys.exit(1)
' "$@"
}
status=0
if ready "Prefect server" "$PREFECT_PID" "$PREFECT_PORT" /api/health logs/prefect-server.log; then
  echo "Prefect UI: http://127.0.0.1:$PREFECT_PORT   (log: logs/prefect-server.log; pid $PREFECT_PID)"
else
  status=1
fi
if ready "MLflow UI" "$MLFLOW_PID" "$MLFLOW_PORT" /health logs/mlflow-ui.log; then
  echo "MLflow UI:  http://127.0.0.1:$MLFLOW_PORT   (log: logs/mlflow-ui.log; pid $MLFLOW_PID)"
else
  status=1
fi
exit "$status"
