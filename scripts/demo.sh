#!/usr/bin/env bash
# Sets up, then trains the default defense (PGD-AT) on Fashion-MNIST for a
# short schedule and evaluates it on the test set. Extra arguments go to
# train.py (e.g. --defense awp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec .venv/bin/python train.py --config configs/fashion_mnist.yaml --epochs 6 \
  --set data.train_examples=20000 --set data.test_examples=2000 "$@"
