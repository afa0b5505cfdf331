"""Typed experiment configuration: dataclasses, YAML files and dotted overrides.

An experiment is a tree of dataclasses (data, model, attack, defense, optim,
eval, runtime). A YAML file sets any subset of its fields; ``--set
key=value`` on the command line sets one dotted field (``optim.lr=0.05``).
Unknown keys and values of the wrong type are refused with a
:class:`~tfrobust.errors.UserError` that names the key.

``plugins`` (``--plugin`` on the command line) lists Python modules, or
``.py`` files, imported (:func:`tfrobust.user_code.import_plugins`) before
the rest of the config is read: a plug-in that
registers a weight-space term (:func:`tfrobust.defense_names.register_term`)
makes its name a defense and its hyperparameters a ``defense.<term>``
section, as for the built-in terms.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from tfrobust.attack_names import MAX_STEPS
from tfrobust.defense_names import registered_terms, term_declaration
from tfrobust.config_files import PACKAGED_CONFIGS, packaged_configs, read_config_file, resolve_config  # noqa: F401
from tfrobust.config_values import coerce
from tfrobust.errors import UserError
from tfrobust.user_code import import_plugins


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
    # Per-channel normalisation of the built-in networks; None: measured on the
    # training images (the user's data) or the data set's known constants.
    mean: Optional[list] = None
    std: Optional[list] = None
    # Extra (generated or pseudo-labelled) images mixed into every training
    # batch: a .npz with image and label arrays (tfrobust/extra_data.py),
    # converted once to .npy files in extra_cache_dir (default <file>.cache).
    # Without labels only TRADES's KL term uses the images (trades, trades+awp).
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
    # None: the data's default budget, default_eps(data.name) (0.1 for mnist and
    # fashion_mnist, 8/255 for any other data), the same rule as evaluate.py's.
    eps: Optional[float] = None
    step_size: Optional[float] = None  # None: eps / 4
    steps: int = 10
    # BatchNorm during the attack: "eval" (moving statistics) or "train".
    bn_mode: str = "eval"


def _term_section(name: str):
    """The config section of a registered weight-space term, from its declared hyperparameters.

    A hyperparameter whose default depends on the base objective is None
    here (the base's default); the others hold their default.
    """
    declaration = term_declaration(name)
    fields = []
    for h in declaration.hyperparameters:
        if h.per_base:
            fields.append((h.name, Optional[h.kind], field(default=None)))
        else:
            fields.append((h.name, h.kind, field(default=h.default)))
    section = dataclasses.make_dataclass(f"{name.upper()}Config", fields)
    section.__module__ = __name__
    section.__doc__ = declaration.title + "".join(f"\n\n    {h.name}: {h.help}" for h in declaration.hyperparameters)
    return section


def _defense_config():
    """``DefenseConfig``: the base's settings and one section per registered weight-space term."""
    fields = [("name", str, field(default="at")), ("beta", Optional[float], field(default=None))]
    fields += [(t, section, field(default_factory=section)) for t, section in TERM_SECTIONS.items()]
    fields += [("unclipped_gaussian_start", bool, field(default=False)), ("label_smoothing", float, field(default=0.0))]
    config = dataclasses.make_dataclass("DefenseConfig", fields)
    config.__module__ = __name__
    config.__doc__ = """A base objective plus weight-space terms, e.g. ``trades+awp``.

    name: the defense (tfrobust.defense_names). beta: the TRADES/MART weight
    (None: 6.0). One section per weight-space term registered before this
    module is imported (``awp``, ``s2o``, ``rat``), with the hyperparameters
    the term declares. unclipped_gaussian_start: start the TRADES/MART/RAT
    attack at x + 0.001 N(0, 1) without clipping to [0, 1], as the reference
    code does (docs/algorithms.md, section 9, item 1). label_smoothing: s in
    (1 - s) CE + s mean_k(-log p_k) on the CE term of at/trades (0.1 in the
    weight-averaging references; docs/algorithms.md, section 11).
    """
    return config


# Sections and DefenseConfig are derived from the terms' declarations (tfrobust.defense_names).
TERM_SECTIONS = {t: _term_section(t) for t in registered_terms()}
AWPConfig, S2OConfig, RATConfig = TERM_SECTIONS["awp"], TERM_SECTIONS["s2o"], TERM_SECTIONS["rat"]
DefenseConfig = _defense_config()
_current_defense_config = DefenseConfig


def defense_config_class():
    """``DefenseConfig`` with a section for each term registered now.

    The same class as :data:`DefenseConfig` until a term is registered (or
    removed) after this module's import; then a class with one more (or one
    less) section. :class:`ExperimentConfig` takes its ``defense`` from here.
    """
    global _current_defense_config
    terms = registered_terms()
    if tuple(TERM_SECTIONS) != terms:
        sections = {t: TERM_SECTIONS.get(t) or _term_section(t) for t in terms}
        TERM_SECTIONS.clear()
        TERM_SECTIONS.update(sections)
        _current_defense_config = _defense_config()
    return _current_defense_config


def defense_settings(config) -> dict:
    """The terms' hyperparameters set in a DefenseConfig, keyed like Defense's keywords (``awp_gamma``)."""
    return {
        term_declaration(t).keyword(f.name): getattr(getattr(config, t), f.name)
        for t in TERM_SECTIONS if hasattr(config, t)
        for f in dataclasses.fields(getattr(config, t))
    }


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
    # Gradient accumulation: every batch of data.batch_size examples is processed
    # as this many micro-batches and makes one update, equal to the whole batch's
    # (BatchNorm statistics are per micro-batch; docs/algorithms.md, section 17).
    accumulate_steps: int = 1


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
    # Catastrophic overfitting (tfrobust.collapse): PGD accuracy on the first collapse_examples training examples
    # after each epoch (0: off); a collapse is a fall of more than collapse_drop below the best earlier epoch;
    # collapse_action: record | stop | rollback (to the last good epoch's weights and optimizer slots, then
    # ELLE-A's weight at its maximum or, without it, collapse_pgd_epochs epochs of PGD for a single-step base).
    collapse_examples: int = 0
    collapse_drop: float = 0.2
    collapse_action: str = "record"
    collapse_pgd_epochs: int = 1
    # The clean accuracy of the training batches in the logs. AT makes one inference-mode pass per step for it
    # (about 4% of a PreActResNet-18 step, which the reference scripts do not make); false skips it. TRADES and
    # MART report it from their own forward pass whatever this says.
    train_clean_accuracy: bool = True


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

    plugins: list = field(default_factory=list)  # modules or .py files imported first (module docstring)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    defense: DefenseConfig = field(default_factory=lambda: defense_config_class()())
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


STRATEGIES = ("default", "mirrored", "tpu", "multi_worker")
# The names tfrobust.data and tfrobust.models implement (kept here, free of TensorFlow, so that a
# misspelt name is refused before TensorFlow is imported).
DATA_SETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn_cropped")
MODEL_NAMES = ("small_cnn", "preact_resnet18", "wide_resnet", "wide_resnet_swish")
SCHEDULES = ("piecewise", "cosine")
WEIGHT_DECAY_EXCLUDE = ("none", "batchnorm", "batchnorm_and_bias")
PRECISIONS = ("none", "mixed_float16", "mixed_bfloat16")


# The budget (L-inf, images in [0, 1]) of the data sets whose papers use 0.1; every other data set gets 8/255.
MNIST_LIKE = ("mnist", "fashion_mnist")


def default_eps(data_name) -> float:
    """The attack budget used when none is given, for training and evaluation alike.

    0.1 for ``mnist`` and ``fashion_mnist``; 8/255 for any other data (the
    CIFAR/SVHN convention), the user's own files and folders included.
    """
    return 0.1 if str(data_name) in MNIST_LIKE else 8 / 255


def resolve_attack(config) -> None:
    """Fills ``attack.eps`` (None: :func:`default_eps` of the data) and ``attack.step_size`` (None: eps / 4)."""
    if config.attack.eps is None:
        config.attack.eps = default_eps(config.data.name)
    if config.attack.step_size is None:
        config.attack.step_size = config.attack.eps / 4


def to_dict(config) -> dict:
    """The config as plain nested dicts (for YAML and JSON); ``plugins`` only when there are some."""
    values = dataclasses.asdict(config)
    if "plugins" in values and not values["plugins"]:
        del values["plugins"]
    return values


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
            setattr(config, key, coerce(value, types[key], full))


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None, plugins=(),
                import_code: bool = True) -> ExperimentConfig:
    """Builds a config from defaults, an optional YAML file and dotted overrides.

    Args:
      path: a YAML file whose nested mapping sets fields, or the name of a
        packaged config (:func:`packaged_configs`), or None.
      overrides: ``{"optim.lr": "0.05", ...}``; values are strings or values.
        ``"plugins"`` among them replaces the file's list.
      plugins: plug-ins added after those of the file (or of ``overrides``),
        each once: the command line's ``--plugin``.
      import_code: False to read the config without importing its plug-ins
        (``--print-config``); keys that only a plug-in defines are then refused.
    """
    values = {}
    if path is not None:
        values = read_config_file(resolve_config(path))
    overrides = overrides or {}
    named = overrides.get("plugins", values.get("plugins") if isinstance(values, dict) else None)
    named = coerce(named, list, "plugins") if named is not None else []
    added = [p for p in dict.fromkeys(plugins) if p not in named]
    if import_code:
        import_plugins(named + added)
    try:
        config = ExperimentConfig()  # after the plug-ins: their terms' sections are part of it
        if path is not None:
            _merge(config, values)
        for key, value in overrides.items():
            set_value(config, key, value)
        if added:
            config.plugins = list(config.plugins) + added
        resolve_attack(config)
        validate(config)
    except UserError as e:
        if import_code or not named + added:
            raise
        raise UserError(f"{e}; --print-config does not import the plug-ins ({', '.join(map(str, named + added))})") from None
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
        (config.attack.eps is None or config.attack.eps >= 0, "attack.eps must be >= 0"),
        (config.attack.step_size is None or config.attack.step_size >= 0, "attack.step_size must be >= 0"),
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
        (config.eval.pgd_steps >= 1, "eval.pgd_steps must be >= 1 (validation and the final evaluation run PGD with it)"),
        (config.eval.flatness_every >= 0, "eval.flatness_every must be >= 0"),
        (config.eval.flatness_examples > 0, "eval.flatness_examples must be > 0"),
        (config.eval.flatness_samples > 0, "eval.flatness_samples must be > 0"),
        (config.runtime.jit_compile in ("auto", "on", "off"), f"unknown runtime.jit_compile {config.runtime.jit_compile!r}; allowed: auto, off, on"),
        (config.runtime.strategy in STRATEGIES, f"unknown runtime.strategy {config.runtime.strategy!r}; allowed: {', '.join(STRATEGIES)}"),
        (config.runtime.mixed_precision in PRECISIONS, f"unknown runtime.mixed_precision {config.runtime.mixed_precision!r}; allowed: {', '.join(PRECISIONS)}"),
        (config.optim.early_stopping_patience >= 0, "optim.early_stopping_patience must be >= 0"),
        (config.eval.images_every >= 0, "eval.images_every must be >= 0"),
        (config.eval.collapse_examples >= 0, "eval.collapse_examples must be >= 0"),
        (0 <= config.eval.collapse_drop <= 1, "eval.collapse_drop must be in [0, 1]"),
        (config.eval.collapse_pgd_epochs >= 0, "eval.collapse_pgd_epochs must be >= 0"),
        (config.eval.collapse_action in ("record", "stop", "rollback"),
         f"unknown eval.collapse_action {config.eval.collapse_action!r}; allowed: record, rollback, stop"),
        (0 < config.data.extra_fraction < 1, "data.extra_fraction must be in (0, 1)"),
        (config.eval.pgd_loss in ("ce", "cw"), f"unknown eval.pgd_loss {config.eval.pgd_loss!r}; allowed: ce, cw"),
        (0 <= config.defense.label_smoothing < 1, "defense.label_smoothing must be in [0, 1)"),
        (config.optim.schedule in SCHEDULES, f"unknown optim.schedule {config.optim.schedule!r}; allowed: {', '.join(SCHEDULES)}"),
        (config.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (config.optim.warmup_epochs < config.optim.epochs or config.optim.warmup_epochs == 0, "optim.warmup_epochs must be < optim.epochs"),
        (config.optim.weight_decay_exclude in WEIGHT_DECAY_EXCLUDE, f"unknown optim.weight_decay_exclude {config.optim.weight_decay_exclude!r}; allowed: {', '.join(WEIGHT_DECAY_EXCLUDE)}"),
        (0 <= config.optim.ema_decay < 1, "optim.ema_decay must be in [0, 1)"),
        (0 <= config.optim.ema_start < 1, "optim.ema_start must be in [0, 1)"),
        (config.eval.integrity_examples >= 0, "eval.integrity_examples must be >= 0"),
        (config.optim.accumulate_steps >= 1, "optim.accumulate_steps must be >= 1"),
        (config.optim.accumulate_steps < 1 or config.data.batch_size % config.optim.accumulate_steps == 0,
         f"data.batch_size {config.data.batch_size} is not divisible by optim.accumulate_steps="
         f"{config.optim.accumulate_steps} (the micro-batches must be equal)"),
    ]
    from tfrobust.defense_names import check_defense_name, resolve_settings

    _check_data_name(str(config.data.name))
    _check_model_name(str(config.model.name))
    base = check_defense_name(config.defense.name).split("+")[0]
    resolve_settings(base, defense_settings(config.defense))
    _check_numbers(config)
    decay_at = config.optim.decay_at
    checks += [
        (config.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (config.optim.momentum >= 0, "optim.momentum must be >= 0"),
        (0 < config.optim.decay_factor <= 1, "optim.decay_factor must be in (0, 1]"),
        (all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in decay_at),
         f"optim.decay_at needs numbers (fractions of training), got {decay_at!r}"),
        (config.runtime.seed >= 0, "runtime.seed must be >= 0"),
        (config.eval.step_size is None or config.eval.step_size > 0, "eval.step_size must be > 0"),
        (config.attack.steps <= MAX_STEPS, f"attack.steps must be <= {MAX_STEPS} (the PGD loop is unrolled when traced)"),
        (config.eval.pgd_steps <= MAX_STEPS, f"eval.pgd_steps must be <= {MAX_STEPS} (the PGD loop is unrolled when traced)"),
        (all(_number_list(getattr(config.data, k)) for k in ("mean", "std")),
         f"data.mean and data.std need a list of numbers (one per channel), got {config.data.mean!r} and "
         f"{config.data.std!r}"),
        (config.runtime.devices is None or all(isinstance(d, str) and d for d in config.runtime.devices),
         f"runtime.devices needs device names such as GPU:0, got {config.runtime.devices!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    for f in decay_at:
        if not 0 < f < 1:
            raise UserError(f"optim.decay_at values are fractions of training in (0, 1), got {f}")


MAX_INT = 2**31 - 1


def _number_list(value) -> bool:
    """None, or a list of finite numbers (no strings, no booleans)."""
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def _check_data_name(name: str) -> None:
    """Refuses a missing data file or folder at once; other names are tfds names, checked once TensorFlow loads.

    The kinds follow :func:`tfrobust.data.source_kind`.
    """
    if name in DATA_SETS:
        return
    if name.lower().endswith(".npz"):
        if not os.path.isfile(name):
            raise UserError(f"data file not found: {name}")
    elif name.startswith(("/", ".", "~")) and not os.path.isdir(name):
        raise UserError(f"data folder not found: {name}")


def _check_model_name(name: str) -> None:
    """A built-in network, an existing .keras file, or module:function (imported later)."""
    if name in MODEL_NAMES or ":" in name:
        return
    if name.endswith(".keras"):
        if not os.path.isfile(name):
            raise UserError(f"model file not found: {name}")
        return
    raise UserError(
        f"unknown model {name!r}; allowed: {', '.join(sorted(MODEL_NAMES))}, a .keras file, "
        "or module:function (a function returning a Keras network)"
    )


def _check_numbers(config, prefix: str = "") -> None:
    """Every number in the config is finite, every integer fits TensorFlow's int32 (huge values are typos)."""
    import math

    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config key {key!r} must be finite, got {value}")
        elif isinstance(value, int) and abs(value) > MAX_INT:
            raise UserError(f"config key {key!r} is too large: {value}")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, float) and not math.isfinite(item):
                    raise UserError(f"config key {key!r} must hold finite numbers, got {item}")


__all__ = [
    "DataConfig",
    "ModelConfig",
    "AttackConfig",
    "AWPConfig",
    "S2OConfig",
    "RATConfig",
    "DefenseConfig",
    "TERM_SECTIONS",
    "defense_settings",
    "OptimConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ExperimentConfig",
    "STRATEGIES",
    "DATA_SETS",
    "MODEL_NAMES",
    "PACKAGED_CONFIGS",
    "packaged_configs",
    "resolve_config",
    "PRECISIONS",
    "SCHEDULES",
    "WEIGHT_DECAY_EXCLUDE",
    "MNIST_LIKE",
    "default_eps",
    "resolve_attack",
    "to_dict",
    "load_config",
    "set_value",
    "parse_overrides",
    "validate",
]
