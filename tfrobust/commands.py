"""The ``tfrobust`` console command installed with the package.

``tfrobust train ...``, ``tfrobust evaluate ...`` and ``tfrobust pseudo-label
...`` take exactly the flags of ``python train.py``, ``python evaluate.py`` and
``python pseudo_label.py`` (the same functions run behind both); ``tfrobust configs`` lists the papers' settings shipped inside the
package, each usable as ``--config NAME``. ``tfrobust-train`` and
``tfrobust-evaluate`` are the same two commands under their own names, and
``python -m tfrobust`` is ``tfrobust``.
"""

from __future__ import annotations

import sys

from tfrobust.cli import list_configs

USAGE = """usage: tfrobust {train,evaluate,pseudo-label,configs,import-model,export-model} [flags]

  train         adversarial training (flags: tfrobust train --help)
  evaluate      robust accuracy, AutoAttack, flatness (flags: tfrobust evaluate --help)
  pseudo-label  label an unlabelled .npz with a trained network (flags: tfrobust pseudo-label --help)
  configs       list the experiment configs shipped with tfrobust (use one with --config NAME)
  import-model  a released checkpoint (RobustBench, DeepMind, PyTorch) as a .keras network
  export-model  a tfrobust network as a state dict in its architecture's published names
"""


def main(argv=None) -> int:
    """``tfrobust SUBCOMMAND [flags]``; returns the exit status."""
    from tfrobust import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    entries = {"train": cli.train_main, "evaluate": cli.evaluate_main, "pseudo-label": cli.pseudo_label_main,
               "import-model": cli.import_model_main, "export-model": cli.export_model_main}
    if command == "configs":
        if rest:
            print(f"error: 'tfrobust configs' takes no arguments, got {' '.join(rest)}", file=sys.stderr)
            return 2
        return list_configs()
    if command not in entries:
        print(f"error: unknown command {command!r}; allowed: configs, evaluate, export-model, import-model, pseudo-label, train (see tfrobust --help)",
              file=sys.stderr)
        return 2
    program = sys.argv[0]
    sys.argv[0] = f"tfrobust {command}"  # argparse names the program in usage lines
    try:
        return entries[command](rest)
    finally:
        sys.argv[0] = program


def run() -> None:
    """Entry point of the ``tfrobust`` console script."""
    sys.exit(main())


def train() -> None:
    """Entry point of ``tfrobust-train`` (= ``python train.py``)."""
    from tfrobust import cli

    sys.exit(cli.train_main())


def evaluate() -> None:
    """Entry point of ``tfrobust-evaluate`` (= ``python evaluate.py``)."""
    from tfrobust import cli

    sys.exit(cli.evaluate_main())


__all__ = ["main", "list_configs", "run", "train", "evaluate"]
