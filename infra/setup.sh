#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for dq: the bundled real data, a virtualenv, the project.
# Idempotent; run from the repository root: bash infra/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
# Fashion-MNIST (the default dataset) and the fortunes text corpus, both real data offline;
# PostgreSQL and Chromium for the production-like stack and its tests (tests/test_ops.py, test_browser.py).
PACKAGES="dataset-fashion-mnist fortunes postgresql chromium"
MISSING="$(for p in $PACKAGES; do dpkg -s "$p" > /dev/null 2>&1 || echo "$p"; done)"
if [ -n "$MISSING" ]; then
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Torch first, pinned: these wheels are the ones this project is tested with.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
# Pinned to a tested set (infra/constraints.txt): an unconstrained resolve of moto + s3fs
# backtracks into releases that fail to build.
.venv/bin/pip install -q -c infra/constraints.txt -e ".[dev,text,ops]"
# Create the Prefect database once: the first cold start of a temporary server can exceed 20 s.
.venv/bin/prefect server database upgrade -y > /dev/null
echo "dq is set up: .venv/bin/dq --help"
