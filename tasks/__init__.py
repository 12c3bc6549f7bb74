"""Prefect tasks: thin wrappers that call one dq_ops stage and add caching, retries, artifacts and tracking."""

from tasks.offline import set_offline_env

set_offline_env()  # before any task module imports Prefect or MLflow
