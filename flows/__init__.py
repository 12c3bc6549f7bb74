"""The Prefect flows that run the pipeline, and the ``dq`` command line (``flows.cli``)."""
