#!/usr/bin/env bash
# Start the Prefect server and the MLflow UI on loopback for a store, in the background.
#   bash infra/servers.sh [STORE]        (default ./dq-store)
# Then: export PREFECT_API_URL=http://127.0.0.1:4200/api so that `dq run` and workers report there.
set -euo pipefail
cd "$(dirname "$0")/.."
STORE="$(realpath -m "${1:-./dq-store}")"
mkdir -p "$STORE" logs
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
nohup .venv/bin/prefect server start --host 127.0.0.1 --port 4200 > logs/prefect-server.log 2>&1 &
echo "Prefect UI: http://127.0.0.1:4200   (log: logs/prefect-server.log)"
# One worker and no job processes keep the MLflow server small (its default starts several).
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nohup .venv/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 \
  --backend-store-uri "sqlite:///$STORE/mlflow.db" > logs/mlflow-ui.log 2>&1 &
echo "MLflow UI:  http://127.0.0.1:5000   (log: logs/mlflow-ui.log)"
