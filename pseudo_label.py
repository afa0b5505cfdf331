"""Pseudo-label an unlabelled .npz with a trained network: ``python pseudo_label.py --model RUN --data pool.npz --output labelled.npz``."""

from tfrobust.cli import main_guard, pseudo_label_main

if __name__ == "__main__":
    main_guard(pseudo_label_main)
