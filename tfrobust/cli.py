"""Command-line entry points behind train.py and evaluate.py.

A user's mistake (unknown name, bad value, missing file, occupied workdir,
damaged run files, the user's code failing) raises a UserError wherever it is
found; one boundary, :func:`_user_errors` around each command, prints its one
line ``error: ...`` and exits with status 2, without a traceback. The user's
code is called inside :func:`tfrobust.errors.user_code` (or ``plugin_code``),
which turns what it raises into such a line naming the module, function and
message. Any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import shlex
import sys

from tfrobust.errors import UserError, plugin_code


def _quiet_tensorflow():
    """Imports TensorFlow without its start-up lines (oneDNN, CUDA drivers, CPU instructions).

    Those lines are written to the stderr file descriptor before TensorFlow's
    logging reads TF_CPP_MIN_LOG_LEVEL, so they are silenced by pointing that
    descriptor at /dev/null during the import. A user who sets
    TF_CPP_MIN_LOG_LEVEL below 2 sees them as before.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] not in ("2", "3"):
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_device_start():
    """Initialises TensorFlow's devices with stderr silenced (a GPU-less machine logs a failed cuInit)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") not in ("2", "3"):
        return
    import tensorflow as tf

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        tf.config.list_logical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _run_failures():
    """Failures of a run that end with one line and exit status 1 (nothing to fix in the command)."""
    from tfrobust.callbacks import TrainingDiverged
    from tfrobust.multiworker import WorkerLost

    return TrainingDiverged, WorkerLost


def _resume_command(argv, workdir: str) -> str:
    """The command line that resumes this run: the same arguments, with ``--workdir``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--workdir" or a.startswith("--workdir=") for a in args):
        args += ["--workdir", workdir]
    program = sys.argv[0] if sys.argv and sys.argv[0] else ""
    main_module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if program.startswith("tfrobust "):  # the tfrobust command (tfrobust/commands.py) names its sub-command there
        prefix = program.split()
        if main_module == "tfrobust.__main__":
            prefix = [sys.executable, "-m"] + prefix
    elif argv is not None or not program:
        prefix = [sys.executable, "train.py"]
    else:
        prefix = [sys.executable, program] if program.endswith(".py") else [program]
    return shlex.join(prefix + args)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster manager, ``kill``), raised where Python would raise KeyboardInterrupt for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within the block SIGTERM stops the command as Ctrl-C does (unless a handler of the caller's is set)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is terminate:  # unless something set its own meanwhile
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _os_error_text(e: OSError) -> str:
    """``strerror (ENAME) (the file or directory)``; for a full disk, the directory and how to go on."""
    import errno

    name = errno.errorcode.get(e.errno, "")
    text = f"{e.strerror or e}" + (f" ({name})" if name else "")
    filename = getattr(e, "filename", None)
    if e.errno == errno.ENOSPC and filename:
        directory = filename if os.path.isdir(filename) else os.path.dirname(os.path.abspath(filename))
        return f"{text} in {directory}; free some space and rerun the same command to resume"
    return text + (f" ({filename})" if filename else "")


@contextlib.contextmanager
def _user_errors(resume=None):
    """Maps errors to one line and an exit status; ``resume["command"]``, once set, is printed on Ctrl-C."""
    try:
        with _sigterm_as_interrupt():
            yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except _run_failures() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # disk full, read-only or vanished directories
        print(f"error: file system: {_os_error_text(e)}; every file is written under a temporary name "
              "first, so the files already there are complete", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a full disk found by a writer that does not raise OSError (TensorFlow's, HDF5's)
        if "No space left on device" not in str(e):
            raise
        detail = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: file system: No space left on device (ENOSPC): {detail}; every file is written under a "
              "temporary name first, so the files already there are complete; free some space and rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        command = (resume or {}).get("command")
        print(f"{what}; resume with: {command}" if command else what, file=sys.stderr)
        sys.exit(143 if isinstance(e, _Terminated) else 130)  # 128 + the signal's number, as the shell reports


def train_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Adversarial training with weight-space defenses (AT, TRADES, MART + AWP, S2O, RAT).")
    p.add_argument("--config", help="YAML experiment file, or the name of a packaged config (--list-configs); "
                   "default: the Fashion-MNIST defaults")
    p.add_argument("--defense", help="e.g. at, trades, mart, awp, s2o, rat, trades+awp, trades+awp+s2o, fgsm_rs, n_fgsm+awp, "
                                     "fgsm+gradalign, n_fgsm+elle_a")
    p.add_argument("--data", help="data: fashion_mnist, mnist, cifar10, cifar100, svhn_cropped, any tfds name, "
                                  "an image folder (one sub-folder per class) or a .npz with x_train, y_train, x_test, y_test")
    p.add_argument("--model", help="network: small_cnn, preact_resnet18, wide_resnet, a .keras file, or module:function "
                                   "returning a Keras network (called with input_shape=, num_classes=); "
                                   "images in [0, 1] -> logits")
    p.add_argument("--epochs", type=int, help="number of training epochs")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="a Python module or .py file imported first, e.g. one that registers a weight-space term "
                        "(repeatable; added to the config's plugins)")
    p.add_argument("--workdir", help="run directory (default: runs/<data>-<defense>-<time>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=0.05 (repeatable)")
    p.add_argument("--no-eval", action="store_true", help="train only; skip the final test evaluation")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (file, flags and --set applied) as YAML and exit")
    p.add_argument("--list-configs", action="store_true",
                   help="list the configs shipped with tfrobust (usable as --config NAME) and exit")
    return p


def train_main(argv=None) -> int:
    args = train_parser().parse_args(argv)
    if args.list_configs:
        return list_configs()
    resume = {}
    with _user_errors(resume):
        from tfrobust import config as config_lib

        overrides = {}
        for flag, key in (("defense", "defense.name"), ("data", "data.name"), ("model", "model.name"),
                          ("epochs", "optim.epochs"), ("seed", "runtime.seed")):
            if getattr(args, flag) is not None:
                overrides[key] = getattr(args, flag)
        overrides.update(config_lib.parse_overrides(args.set))
        # Names and values are checked before TensorFlow is imported (seconds), so a typo is refused at once.
        # Printing a config never runs code: its plug-ins are not imported.
        cfg = config_lib.load_config(args.config, overrides, plugins=args.plugin or (), import_code=not args.print_config)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), end="")
            return 0
        if args.workdir is not None and not args.workdir.strip():
            raise UserError("--workdir must not be empty")
        _check_utf8_path(args.workdir, "--workdir")
        if cfg.runtime.strategy == "multi_worker" and not args.workdir:
            raise UserError("runtime.strategy=multi_worker needs --workdir (the same on every worker)")
        _quiet_tensorflow()
        from tfrobust.defenses import parse_defense

        # The defense is parsed and checked once, here, and handed down to training.
        defense = parse_defense(cfg.defense.name, cfg.defense)
        cfg.defense.name = defense.name
        from tfrobust import data as data_lib
        from tfrobust import models

        data_lib.check_source(cfg.data.name)
        models.check_model_name(cfg.model.name)
        if cfg.data.extra_data:
            from tfrobust import extra_data

            # The pool is converted and checked (as --data arrays are) before a run directory is made.
            extra_data.prepare_pool(cfg.data.extra_data, cfg.data.extra_cache_dir)
            labelled = extra_data.has_labels(cfg.data.extra_data, cfg.data.extra_cache_dir)
            extra_data.check_labels_for(defense, cfg.data.extra_data, labelled)
        if models.model_kind(cfg.model.name) != "builtin":
            # The user's network is checked against the data before a run directory is made.
            from tfrobust.trainer import check_outputs_are_logits

            if cfg.runtime.strategy != "multi_worker":  # building it starts the devices
                _quiet_device_start()

            info = data_lib.source_info(cfg.data.name, cfg.data.data_dir)
            network = models.user_network(cfg.model.name, info.image_shape, info.num_classes)
            classes = check_outputs_are_logits(network, info.image_shape)
            for term in defense.weight_space_terms():  # the defense's requirements on the network
                with plugin_code(term, f"weight-space term {term.name!r}"):
                    term.check_network(network, classes)
        workdir = args.workdir or os.path.join(
            "runs", f"{_run_label(cfg.data.name)}-{cfg.defense.name.replace('+', '_')}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        )
        from tfrobust import evaluation, experiment

        if cfg.runtime.strategy != "multi_worker":  # the multi-worker strategy must come before any device use
            _quiet_device_start()
        print(f"run directory: {workdir}")
        resume["command"] = _resume_command(argv, workdir)
        if args.no_eval:
            experiment.train(cfg, workdir, defense=defense)
            return 0
        report = experiment.train_and_evaluate(cfg, workdir, verbose=cfg.runtime.verbose > 0, defense=defense)
        for which, result in report["models"].items():
            print(f"\n{which} checkpoint ({'chosen on validation PGD accuracy' if which == 'best' else 'final epoch'}):")
            print(evaluation.format_table(result))
        if report["train_seconds"] is not None:  # None on a non-chief worker of a run trained before
            print(f"\ntraining time: {report['train_seconds']:.0f} s; report: {os.path.join(workdir, experiment.REPORT)}")
    return 0


def _check_utf8_path(path, flag: str) -> None:
    """Refuses a path whose name is not UTF-8 (TensorFlow's file functions take UTF-8 names only)."""
    try:
        (path or "").encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {path.encode('utf-8', 'surrogateescape')!r} is not a UTF-8 name; TensorFlow "
                        "writes only UTF-8 paths, rename it") from None


def _run_label(data_name: str) -> str:
    """A file-name-safe label for a data source (a path becomes its last component)."""
    base = os.path.basename(os.path.normpath(str(data_name))) or "data"
    base = os.path.splitext(base)[0] if base.endswith(".npz") else base
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base)


def _number(text: str) -> float:
    """A float, or a fraction ``a/b`` such as ``8/255`` (the same reading as ``--set key=8/255``)."""
    from tfrobust.errors import parse_number

    try:
        return parse_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None


def evaluate_parser() -> argparse.ArgumentParser:
    from tfrobust.attack_names import attack_names_help

    p = _Parser(description="Robust accuracy of a SavedModel, a .keras file or a tfrobust run directory.")
    p.add_argument("--model", required=True, help="run directory, SavedModel directory or .keras file")
    p.add_argument("--data", help="data set, image folder or .npz, as for training (default: the run's, else fashion_mnist)")
    p.add_argument("--data-dir", help="directory with the data set's files")
    p.add_argument("--eps", type=_number, help="attack budget, a number or a fraction such as 8/255 (default: the "
                   "run's, else 0.1 for mnist and fashion_mnist, 8/255 for any other data, as in training)")
    p.add_argument("--norm", choices=("linf", "l2"), help="threat model (default: the run's, else linf)")
    p.add_argument("--attacks", default="clean,fgsm,pgd20_ce,pgd20_cw", help=f"comma-separated: {attack_names_help()}")
    p.add_argument("--examples", type=int, help="evaluate N test examples drawn at random with --seed, every class in "
                   "proportion to its frequency (the same seed, the same examples; default: the whole test set)")
    p.add_argument("--integrity-examples", type=int, default=200,
                   help="run the integrity probes (eps 0, large eps, more steps, Square vs gradients) on the "
                        "first N examples (default 200; 0: skip)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="write the JSON report here (an existing file is not overwritten), a "
                   "RobustBench-style summary next to it (r.json: r.robustbench.json), and the AutoAttack verdicts "
                   "as they are decided to <output>.partial.jsonl: rerunning an interrupted command resumes there; "
                   "<output>.lock keeps a second evaluation from writing the same output")
    p.add_argument("--strategy", choices=("default", "mirrored"),
                   help="split each AutoAttack batch across the local devices with a MirroredStrategy (default: "
                        "mirrored when the run trained with runtime.strategy mirrored or multi_worker, else one "
                        "device)")
    p.add_argument("--plugin", action="append", metavar="MODULE",
                   help="import this module or .py file first, e.g. the one defining a subclassed network saved in "
                        "--model (repeatable; a run directory imports what its training imported by itself)")
    p.add_argument("--which", choices=("last", "best"), default="last",
                   help="for a run directory: the last network or the one chosen on validation")
    p.add_argument("--flatness", action="store_true",
                   help="add average- and worst-case flatness of the robust and clean loss (Stutz et al. 2021)")
    p.add_argument("--flatness-examples", type=int, default=1000, help="test examples for --flatness (default 1000)")
    p.add_argument("--flatness-restarts", type=int, default=1, help="PGD restarts in the robust loss (reference: 10)")
    p.add_argument("--landscape", nargs="?", const="", metavar="DIR",
                   help="write 1-D loss landscapes (random and adversarial direction; JSON and PNG) to DIR "
                        "(default: <run>/landscape)")
    return p


def evaluate_main(argv=None) -> int:
    args = evaluate_parser().parse_args(argv)
    with _user_errors():
        from tfrobust.attack_names import parse_attacks

        _check_evaluate_args(args)  # before TensorFlow is imported: a typo is refused at once
        names = parse_attacks(args.attacks)
        with contextlib.ExitStack() as stack:
            if args.output is not None:  # taken before TensorFlow is imported: a second writer is refused at once
                from tfrobust.rundir import check_new_file, output_lock

                stack.enter_context(output_lock(args.output))
                check_new_file(args.output, "--output")
            _quiet_tensorflow()
            _quiet_device_start()
            from tfrobust import evaluation

            evaluation.evaluate_run(
                args.model, names, which=args.which, data=args.data, data_dir=args.data_dir, eps=args.eps,
                norm=args.norm, examples=args.examples, seed=args.seed, batch_size=args.batch_size,
                integrity_examples=args.integrity_examples, strategy=args.strategy, output=args.output,
                flatness={"examples": args.flatness_examples, "restarts": args.flatness_restarts} if args.flatness else None,
                landscape=args.landscape, plugins=args.plugin or (),
            )
    return 0


def _check_evaluate_args(args) -> None:
    """Refuses bad values and an unwritable --output before any model or data is loaded."""
    import math

    if args.output is not None:
        from tfrobust.rundir import check_new_file

        check_new_file(args.output, "--output")
    if args.examples is not None and args.examples <= 0:
        raise UserError("--examples must be > 0")
    if args.eps is not None and not math.isfinite(args.eps):
        raise UserError(f"--eps must be finite, got {args.eps}")
    if args.eps is not None and args.eps < 0:
        raise UserError(f"--eps must be >= 0, got {args.eps}")
    if args.batch_size <= 0:
        raise UserError("--batch-size must be > 0")
    if not 0 <= args.seed <= 2**31 - 1:  # the largest seed TensorFlow's random ops take everywhere
        raise UserError(f"--seed must be between 0 and {2**31 - 1}, got {args.seed}")
    if args.integrity_examples < 0:
        raise UserError("--integrity-examples must be >= 0")
    if args.flatness_examples <= 0:
        raise UserError("--flatness-examples must be > 0")
    if args.flatness_restarts <= 0:
        raise UserError("--flatness-restarts must be > 0")


def pseudo_label_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Label the images of a .npz with a trained network (pseudo-labels for data.extra_data).")
    p.add_argument("--model", required=True, help="a run directory, a SavedModel directory or a .keras file")
    p.add_argument("--which", default="best", choices=("last", "best"), help="for a run directory: which network")
    p.add_argument("--data", required=True, help=".npz with the images (key image, images or x)")
    p.add_argument("--output", required=True, help="the .npz to write (image and label); must not exist")
    p.add_argument("--batch-size", type=int, default=512)
    return p


def pseudo_label_main(argv=None) -> int:
    args = pseudo_label_parser().parse_args(argv)
    _quiet_tensorflow()
    _quiet_device_start()  # before the user's network is loaded: no cuInit line on a machine without a GPU
    with _user_errors():
        if args.batch_size <= 0:
            raise UserError("--batch-size must be > 0")
        from tfrobust import extra_data, loading

        loaded = loading.load(args.model, args.which)
        count = extra_data.pseudo_label(loaded.model_fn, args.data, args.output, args.batch_size)
        print(f"wrote {count} pseudo-labelled images to {args.output}")
    return 0


def import_model_parser() -> argparse.ArgumentParser:
    from tfrobust.zoo.names import ARCH_HELP

    p = _Parser(description="Build a published architecture in Keras and load a released checkpoint into it.")
    p.add_argument("checkpoint", help="a .pt/.pth (PyTorch state dict), .safetensors or DeepMind .npy checkpoint")
    p.add_argument("--arch", required=True, help=ARCH_HELP)
    p.add_argument("--data", default="cifar10", help="cifar10, cifar100 or imagenet: the class count, input size and default normalisation")
    p.add_argument("--output", required=True, help="the .keras file to write (an existing file is not overwritten)")
    p.add_argument("--mean", type=_number, nargs="+", help="per-channel mean inside the network (default: the architecture's)")
    p.add_argument("--std", type=_number, nargs="+", help="per-channel std inside the network (default: the architecture's)")
    p.add_argument("--no-normalisation", action="store_true", help="the network takes [0, 1] images as they are")
    return p


def import_model_main(argv=None) -> int:
    args = import_model_parser().parse_args(argv)
    with _user_errors():
        if args.no_normalisation and (args.mean or args.std):
            raise UserError("--no-normalisation contradicts --mean/--std")
        _quiet_tensorflow()
        _quiet_device_start()
        from tfrobust.zoo import convert

        network = convert.import_model(args.checkpoint, args.arch, args.data, args.output,
                                       mean=() if args.no_normalisation else args.mean, std=args.std)
        norm = convert.normalisation(network)
        print(f"wrote {args.output}: {args.arch}, {network.count_params():,} weights, sha256 "
              f"{convert.provenance(args.output)['sha256'][:16]}... of {args.checkpoint}, normalisation "
              + (f"mean {norm[0]} std {norm[1]}" if norm else "none"))
    return 0


def export_model_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Write a tfrobust network as a state dict in its architecture's published names.")
    p.add_argument("model", help="a run directory or a .keras file")
    p.add_argument("--format", choices=("pytorch", "safetensors"), default="pytorch")
    p.add_argument("--output", required=True, help="the file to write (an existing file is not overwritten)")
    p.add_argument("--which", choices=("last", "best"), default="last", help="for a run directory: which network")
    p.add_argument("--arch", help="the published architecture (default: read from the network's name)")
    return p


def export_model_main(argv=None) -> int:
    args = export_model_parser().parse_args(argv)
    with _user_errors():
        _quiet_tensorflow()
        _quiet_device_start()
        from tfrobust.zoo import convert

        done = convert.export_model(args.model, args.output, args.format, args.which, args.arch)
        norm = done["normalisation"]
        print(f"wrote {args.output}: {done['arch']}, {done['tensors']} tensors; "
              + (f"the network normalises with mean {norm[0]} and std {norm[1]}: give the PyTorch class these"
                 if norm else "no normalisation inside the network"))
    return 0


def list_configs() -> int:
    """Prints every packaged config with its one-line description."""
    from tfrobust.config import packaged_configs

    configs = packaged_configs()
    width = max(len(name) for name in configs)
    for name, description in configs.items():
        print(f"{name:<{width}}  {description}")
    return 0


def main_guard(fn):
    """Runs an entry point and exits with its status."""
    sys.exit(fn())


__all__ = ["train_main", "evaluate_main", "pseudo_label_main", "import_model_main", "export_model_main", "list_configs"]
