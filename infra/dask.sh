#!/usr/bin/env bash
# Start a standalone dask scheduler and N workers on this machine (cluster.kind: address).
#   bash infra/dask.sh [N_WORKERS] [THREADS]     then set cluster: {kind: address, address: tcp://127.0.0.1:8786}
# On a GPU box install the gpu extra and use `dask cuda worker` instead of `dask worker`.
# Workers run plain dq_ops functions: they need the project installed, not a Prefect server.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
nohup .venv/bin/dask scheduler --host 127.0.0.1 --port 8786 > logs/dask-scheduler.log 2>&1 &
sleep 3
for i in $(seq 1 "${1:-2}"); do
  nohup .venv/bin/dask worker tcp://127.0.0.1:8786 --nthreads "${2:-1}" --name "dq-worker-$i" > "logs/dask-worker-$i.log" 2>&1 &
done
echo "dask scheduler: tcp://127.0.0.1:8786 (dashboard http://127.0.0.1:8787)"
