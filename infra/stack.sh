#!/usr/bin/env bash
# Run the production-like dq stack on this machine until Ctrl-C: Postgres (a cluster in ops-state/),
# Prefect server and MLflow server on it with auth, MLflow artifacts on S3, a dask scheduler and
# worker, a Prefect process worker, and the deployments of deployments/prefect.yaml.
#   cp infra/dq.env.example infra/dq.env      (set its secrets; never committed)
#   bash infra/stack.sh [--services ...] [--no-deploy]
# Then, in another shell: eval "$(.venv/bin/python -m infra.services env)" and `dq run` reports there.
# Commands, flags and ports live in infra/services.py; infra/compose.yaml and infra/k8s/ follow it.
# (infra/servers.sh is the zero-setup laptop variant: SQLite, no auth, for the results of `dq run`.)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m infra.services up "$@"
