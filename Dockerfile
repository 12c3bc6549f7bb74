# One image for every dq process: Prefect server and worker, MLflow server, dask scheduler and workers.
# The commands each container runs are in infra/services.py (infra/compose.yaml and infra/k8s/ follow it).
#   docker build -t dq:0.1.0 .
#   docker build -t dq:0.1.0-gpu --build-arg DQ_EXTRAS=server,gpu .      (dask cuda worker)
FROM python:3.11-slim-bookworm

# Bundled real data (Fashion-MNIST, fortunes), as infra/setup.sh installs it.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends dataset-fashion-mnist fortunes \
 && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false HF_HUB_OFFLINE=1
WORKDIR /opt/dq
# Torch first, pinned as in infra/setup.sh.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
COPY infra/constraints.txt infra/constraints.txt
COPY dq_ops dq_ops
COPY tasks tasks
COPY flows flows
# The project stays at /opt/dq: `prefect deploy` runs here, so flow runs start here (prefect.yaml entrypoints).
ARG DQ_EXTRAS=server
RUN pip install -c infra/constraints.txt -e ".[${DQ_EXTRAS}]"
COPY deployments deployments
COPY infra infra

RUN useradd --create-home --uid 1000 dq && mkdir -p /var/lib/dq/store && chown -R dq /var/lib/dq /opt/dq
USER dq
# Prefect server, MLflow server, worker health, dask scheduler and dashboard (infra/services.py PORTS).
EXPOSE 4200 5000 8080 8786 8787
CMD ["dq", "--help"]
