#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for dq: the bundled real data, a virtualenv, the project.
# Idempotent; run from the repository root: bash infra/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! [ -d /usr/share/datasets/fashion-mnist ] || ! [ -d /usr/share/games/fortunes ]; then
  $SUDO apt-get update -qq
  # Fashion-MNIST (the default dataset) and the fortunes text corpus, both real data offline.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist fortunes
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Torch first, pinned: these wheels are the ones this project is tested with.
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[dev,text]"
# Create the Prefect database once: the first cold start of a temporary server can exceed 20 s.
.venv/bin/prefect server database upgrade -y > /dev/null
echo "dq is set up: .venv/bin/dq --help"
