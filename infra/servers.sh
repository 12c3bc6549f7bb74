#!/usr/bin/env bash
# Run the dq stack on this machine until Ctrl-C: Postgres, Prefect server, MLflow server (basic auth,
# artifacts on S3), a dask scheduler and worker, a Prefect process worker, the deployments.
#   cp infra/dq.env.example infra/dq.env   (set its secrets; AWS_ENDPOINT_URL for an S3-compatible store)
#   bash infra/servers.sh [--services ...] [--no-deploy]
# Then, in another shell: eval "$(.venv/bin/python -m infra.services env)" and `dq run` reports there.
# Commands, flags and ports live in infra/services.py (compose and Kubernetes files follow it).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m infra.services up "$@"
