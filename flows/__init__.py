"""The Prefect flows that run the pipeline, and the ``dq`` command line (``flows.cli``)."""

from tasks.offline import set_offline_env

set_offline_env()  # before the flow modules import Prefect or MLflow
