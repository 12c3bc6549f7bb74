"""Prefect tasks: thin wrappers that call one dq_ops stage and add caching, retries, artifacts and tracking."""
