#!/usr/bin/env bash
# Sets up, then trains the default defense on Fashion-MNIST for a short
# schedule and evaluates it on the test set. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec .venv/bin/python train.py --config configs/fashion_mnist_demo.yaml "$@"
