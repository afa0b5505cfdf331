"""Evaluate a model's robustness: ``python evaluate.py --model runs/<run>`` (see README.md)."""

from tfrobust.cli import evaluate_main, main_guard

if __name__ == "__main__":
    main_guard(evaluate_main)
