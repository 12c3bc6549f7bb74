"""dq_ops: the Dataset Quantization library.

Pure algorithms (arrays in, arrays out) live in their own modules (``bins``, ``sampling``,
``baselines``, ...); the storage layer (``store``) and dataset readers (``readers``) are kept
apart so that the algorithms never touch I/O. Nothing here imports Prefect or MLflow.
"""

__version__ = "0.1.0"
