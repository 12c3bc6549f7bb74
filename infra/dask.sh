#!/usr/bin/env bash
# A standalone dask scheduler and one worker on this machine until Ctrl-C (cluster.kind: address):
#   bash infra/dask.sh     then set cluster: {kind: address, address: tcp://127.0.0.1:8786}
# Dashboard: http://127.0.0.1:8787. Workers run plain dq_ops functions: no Prefect server needed.
# On a GPU box, the gpu extra gives `dask cuda worker` (infra/compose.yaml, profile gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m infra.services up --services dask-scheduler dask-worker --no-deploy "$@"
