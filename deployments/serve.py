"""Serve the quantization flow on one box with a schedule (no work pool needed).

    python deployments/serve.py deployments/configs/fashion-mnist.yaml --cron "0 3 * * 1"

Needs a Prefect server (``prefect server start``) and ``PREFECT_API_URL`` pointing at it.
"""

from __future__ import annotations

import argparse

from dq_ops.config import DQConfig
from dq_ops.errors import DQInputError
from flows.quantize import quantize

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("--name", default="dq-served", help="deployment name")
    parser.add_argument("--cron", default="0 3 * * 1", help="schedule (cron, UTC)")
    args = parser.parse_args()
    try:
        config = DQConfig.from_yaml(args.config)
    except DQInputError as exc:
        parser.exit(2, f"error: {exc}\n")
    quantize.serve(name=args.name, cron=args.cron, parameters={"config": config.model_dump(mode="json")})
