"""The switches that keep every run offline: no telemetry, no model-hub downloads.

They must be in the environment before Prefect or MLflow is imported (``import prefect`` starts
its SDK analytics at once), so this module imports nothing but ``os``, and the ``tasks`` and
``flows`` packages call :func:`set_offline_env` in their ``__init__``, before any submodule
imports Prefect.
"""

from __future__ import annotations

import os

# MLflow accepts only the exact value "true".
OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def set_offline_env() -> None:
    """Set the telemetry/hub switches unless the user set them explicitly."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
