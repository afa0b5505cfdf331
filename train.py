"""Train a robust model: ``python train.py --defense s2o`` (see README.md)."""

from tfrobust.cli import main_guard, train_main

if __name__ == "__main__":
    main_guard(train_main)
