"""Typed experiment configuration: dataclasses, YAML files and dotted overrides.

An experiment is a tree of dataclasses (data, model, attack, defense, optim,
eval, runtime). A YAML file sets any subset of its fields; ``--set
key=value`` on the command line sets one dotted field (``optim.lr=0.05``).
Unknown keys and values of the wrong type are refused with a
:class:`~tfrobust.errors.UserError` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from tfrobust.errors import UserError


@dataclass
class DataConfig:
    """Which data set, how much of it, and how it is batched."""

    name: str = "fashion_mnist"
    # Directory with the Fashion-MNIST/MNIST IDX files, or tfds' data_dir.
    data_dir: Optional[str] = None
    # Limits on the number of examples used (None: all). train_examples counts
    # the training examples left after the validation split.
    train_examples: Optional[int] = None
    test_examples: Optional[int] = None
    # Held out from the training split for model selection; never the test set.
    validation_examples: int = 1000
    batch_size: int = 128
    eval_batch_size: int = 256
    # 4-pixel pad and random crop (plus horizontal flip except on SVHN) for the
    # 32x32 data sets; ignored for 28x28 ones.
    augment: bool = True
    shuffle_buffer: int = 10000
    # Extra (generated or pseudo-labelled) images mixed into every training
    # batch: a .npz with image and label arrays (tfrobust/extra_data.py),
    # converted once to .npy files in extra_cache_dir (default <file>.cache).
    extra_data: Optional[str] = None
    extra_fraction: float = 0.7  # of every batch, from extra_data (Wang et al. 2023)
    extra_cache_dir: Optional[str] = None


@dataclass
class ModelConfig:
    """Network architecture; see :mod:`tfrobust.models`."""

    name: str = "small_cnn"
    depth: int = 34  # wide_resnet and wide_resnet_swish only
    width: int = 10  # wide_resnet and wide_resnet_swish only
    cnn_width: int = 1  # small_cnn only: multiplies its widths 32/64/256


@dataclass
class AttackConfig:
    """The inner maximisation used during training (docs/algorithms.md, section 1)."""

    norm: str = "linf"  # linf | l2
    eps: float = 0.1
    step_size: float = 0.025
    steps: int = 10
    # BatchNorm during the attack: "eval" (moving statistics) or "train".
    bn_mode: str = "eval"


@dataclass
class AWPConfig:
    """Adversarial weight perturbation (Wu et al. 2020); None means the paper's default for the base."""

    gamma: Optional[float] = None  # 0.01 for at/mart, 0.005 for trades
    warmup_epochs: Optional[int] = None  # epochs without perturbation


@dataclass
class S2OConfig:
    """Second-order statistics optimisation (Jin et al. 2022)."""

    a: Optional[float] = None  # 0.1 for at, 0.3 for trades/mart


@dataclass
class RATConfig:
    """Randomized adversarial training (Jin et al. 2023)."""

    alpha: float = 0.2
    sigma: float = 1e-4
    # Reproduce the reference code's yy1 = reg_gap(t2_adv - t2_nat).
    reference_quirk: bool = False


@dataclass
class DefenseConfig:
    """A base objective plus weight-space terms, e.g. ``trades+awp``."""

    name: str = "at"
    beta: Optional[float] = None  # TRADES/MART weight; 6.0 by default
    awp: AWPConfig = field(default_factory=AWPConfig)
    s2o: S2OConfig = field(default_factory=S2OConfig)
    rat: RATConfig = field(default_factory=RATConfig)
    # Start the TRADES/MART/RAT attack at x + 0.001 N(0, 1) without clipping to
    # [0, 1], as the reference code does (docs/algorithms.md, section 9, item 1).
    unclipped_gaussian_start: bool = False
    # s in (1 - s) CE + s mean_k(-log p_k) on the CE term of at/trades (0.1 in
    # the weight-averaging references; docs/algorithms.md, section 11).
    label_smoothing: float = 0.0


@dataclass
class OptimConfig:
    """SGD with momentum; a piecewise-constant (the AWP/S2O/RAT papers) or cosine
    learning rate; optional weight averaging (docs/algorithms.md, sections 10, 12)."""

    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # Variables without weight decay: none | batchnorm | batchnorm_and_bias.
    weight_decay_exclude: str = "none"
    # piecewise (decay_at, decay_factor) | cosine (linear warm-up over
    # warmup_epochs from 0 to lr, then cosine to 0 at the end of training).
    schedule: str = "piecewise"
    warmup_epochs: float = 0.0
    # Fractions of training at which the rate is multiplied by decay_factor.
    decay_at: list = field(default_factory=lambda: [0.5, 0.75])
    decay_factor: float = 0.1
    # Exponential moving average of the weights (validation, best checkpoint,
    # report and export use it): decay tau, warmed up as min(tau, (1+d)/(10+d)),
    # starting after the fraction ema_start of training.
    ema: bool = False
    ema_decay: float = 0.995
    ema_start: float = 0.025
    # Stop when validation PGD accuracy has not improved for this many epochs (0: never).
    early_stopping_patience: int = 0


@dataclass
class EvalConfig:
    """PGD used on the validation split after each epoch and on the test split at the end."""

    pgd_steps: int = 20
    step_size: Optional[float] = None  # None: eps / 4
    # The loss validation PGD ascends: ce | cw (the references select on PGD-40 with cw).
    pgd_loss: str = "ce"
    # Average-case robust flatness (Stutz et al. 2021) on the first
    # flatness_examples validation examples every flatness_every epochs (0: off).
    flatness_every: int = 0
    flatness_examples: int = 200
    flatness_samples: int = 5
    # Integrity probes (tfrobust.integrity) on the first N test examples of the final report (0: off).
    integrity_examples: int = 100
    # TensorBoard grid of clean and adversarial validation images every N epochs (0: off).
    images_every: int = 1


@dataclass
class RuntimeConfig:
    """Where and how the computation runs."""

    seed: int = 0
    strategy: str = "default"  # default | mirrored | tpu | multi_worker (cluster from TF_CONFIG)
    devices: Optional[list] = None  # for mirrored, e.g. ["GPU:0", "GPU:1"]
    jit_compile: str = "auto"  # auto | on | off
    # none | mixed_float16 | mixed_bfloat16 (Keras dtype policies).
    mixed_precision: str = "none"
    # tf.config.experimental.enable_op_determinism: identical runs for one seed.
    deterministic: bool = False
    verbose: int = 1


@dataclass
class ExperimentConfig:
    """Everything a training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


STRATEGIES = ("default", "mirrored", "tpu", "multi_worker")
SCHEDULES = ("piecewise", "cosine")
WEIGHT_DECAY_EXCLUDE = ("none", "batchnorm", "batchnorm_and_bias")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")


def to_dict(config) -> dict:
    """The config as plain nested dicts (for YAML and JSON)."""
    return dataclasses.asdict(config)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts ``value`` to the annotated type, or raises UserError naming ``key``."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing), globals())  # noqa: S307 - our own annotations
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"config key {key!r} needs true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UserError(f"config key {key!r} needs a number, got {value!r}")
        try:
            number = float(value) if annotation is float else value
            if annotation is int:
                number = int(value) if not isinstance(value, float) or value.is_integer() else None
                if number is None:
                    raise ValueError
            return number
        except (TypeError, ValueError):
            raise UserError(
                f"config key {key!r} needs {'an integer' if annotation is int else 'a number'}, got {value!r}"
            ) from None
    if annotation is str:
        return str(value)
    if annotation is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key {key!r} needs a list, got {value!r}")
        return list(value)
    return value


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _merge(config, values: dict, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise UserError(f"config section {prefix.rstrip('.') or 'top level'!r} must be a mapping")
    types = _field_types(type(config))
    for key, value in values.items():
        full = prefix + str(key)
        if key not in types:
            allowed = ", ".join(prefix + k for k in types)
            raise UserError(f"unknown config key {full!r}; allowed here: {allowed}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value or {}, full + ".")
        else:
            setattr(config, key, _coerce(value, types[key], full))


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None) -> ExperimentConfig:
    """Builds a config from defaults, an optional YAML file and dotted overrides.

    Args:
      path: a YAML file whose nested mapping sets fields, or None.
      overrides: ``{"optim.lr": "0.05", ...}``; values are strings or values.
    """
    config = ExperimentConfig()
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file not found: {path}")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        _merge(config, values)
    for key, value in (overrides or {}).items():
        set_value(config, key, value)
    validate(config)
    return config


def set_value(config: ExperimentConfig, key: str, value: Any) -> None:
    """Sets one dotted key, e.g. ``set_value(cfg, "attack.eps", "0.03")``."""
    parts = key.split(".")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    _merge(config, nested)


def parse_overrides(items) -> dict:
    """Turns ``["a.b=1", "c=x"]`` into ``{"a.b": "1", "c": "x"}``."""
    result = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = value.strip()
    return result


def validate(config: ExperimentConfig) -> None:
    """Refuses values that cannot work, with a message naming the key."""
    checks = [
        (config.attack.eps >= 0, "attack.eps must be >= 0"),
        (config.attack.step_size >= 0, "attack.step_size must be >= 0"),
        (config.attack.steps >= 0, "attack.steps must be >= 0"),
        (config.attack.norm in ("linf", "l2"), f"unknown attack.norm {config.attack.norm!r}; allowed: l2, linf"),
        (config.attack.bn_mode in ("eval", "train"), f"unknown attack.bn_mode {config.attack.bn_mode!r}; allowed: eval, train"),
        (config.data.batch_size > 0, "data.batch_size must be > 0"),
        (config.data.eval_batch_size > 0, "data.eval_batch_size must be > 0"),
        (config.data.validation_examples >= 0, "data.validation_examples must be >= 0"),
        (config.data.train_examples is None or config.data.train_examples > 0, "data.train_examples must be > 0"),
        (config.data.test_examples is None or config.data.test_examples > 0, "data.test_examples must be > 0"),
        (config.model.cnn_width >= 1, "model.cnn_width must be >= 1"),
        (config.optim.epochs > 0, "optim.epochs must be > 0"),
        (config.optim.lr >= 0, "optim.lr must be >= 0"),
        (config.eval.pgd_steps >= 0, "eval.pgd_steps must be >= 0"),
        (config.eval.flatness_every >= 0, "eval.flatness_every must be >= 0"),
        (config.eval.flatness_examples > 0, "eval.flatness_examples must be > 0"),
        (config.eval.flatness_samples > 0, "eval.flatness_samples must be > 0"),
        (config.runtime.jit_compile in ("auto", "on", "off"), f"unknown runtime.jit_compile {config.runtime.jit_compile!r}; allowed: auto, off, on"),
        (config.runtime.strategy in STRATEGIES, f"unknown runtime.strategy {config.runtime.strategy!r}; allowed: {', '.join(STRATEGIES)}"),
        (config.runtime.mixed_precision in PRECISIONS, f"unknown runtime.mixed_precision {config.runtime.mixed_precision!r}; allowed: {', '.join(PRECISIONS)}"),
        (config.optim.early_stopping_patience >= 0, "optim.early_stopping_patience must be >= 0"),
        (config.eval.images_every >= 0, "eval.images_every must be >= 0"),
        (0 < config.data.extra_fraction < 1, "data.extra_fraction must be in (0, 1)"),
        (not (config.data.extra_data and config.runtime.strategy == "multi_worker"), "data.extra_data is not supported with runtime.strategy=multi_worker"),
        (config.eval.pgd_loss in ("ce", "cw"), f"unknown eval.pgd_loss {config.eval.pgd_loss!r}; allowed: ce, cw"),
        (0 <= config.defense.label_smoothing < 1, "defense.label_smoothing must be in [0, 1)"),
        (config.optim.schedule in SCHEDULES, f"unknown optim.schedule {config.optim.schedule!r}; allowed: {', '.join(SCHEDULES)}"),
        (config.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (config.optim.warmup_epochs < config.optim.epochs or config.optim.warmup_epochs == 0, "optim.warmup_epochs must be < optim.epochs"),
        (config.optim.weight_decay_exclude in WEIGHT_DECAY_EXCLUDE, f"unknown optim.weight_decay_exclude {config.optim.weight_decay_exclude!r}; allowed: {', '.join(WEIGHT_DECAY_EXCLUDE)}"),
        (0 <= config.optim.ema_decay < 1, "optim.ema_decay must be in [0, 1)"),
        (0 <= config.optim.ema_start < 1, "optim.ema_start must be in [0, 1)"),
        (config.eval.integrity_examples >= 0, "eval.integrity_examples must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


__all__ = [
    "DataConfig",
    "ModelConfig",
    "AttackConfig",
    "AWPConfig",
    "S2OConfig",
    "RATConfig",
    "DefenseConfig",
    "OptimConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ExperimentConfig",
    "STRATEGIES",
    "PRECISIONS",
    "SCHEDULES",
    "WEIGHT_DECAY_EXCLUDE",
    "to_dict",
    "load_config",
    "set_value",
    "parse_overrides",
    "validate",
]
