"""tfrobust: adversarial training in weight space (AWP, S2O, RAT with AT, TRADES, MART) for Keras.

The public API, one import away (``import tfrobust as tr``):

Training
  - ``RobustModel(network, defense, eps, step_size, steps, ...)``: a
    ``keras.Model`` whose ``train_step`` performs adversarial training of any
    Keras network mapping images in [0, 1] to logits; ``fit``, callbacks,
    ``save``/``load_model`` work as for any Keras model.
  - ``Defense("trades+awp", awp_gamma=0.005)``: a defense from its name with
    keyword overrides (papers' defaults otherwise); ``parse_defense`` builds
    one from a config; ``DEFENSES`` lists the names.
  - ``WeightSpaceTerm``, ``register_term``, ``Hyperparameter``: a new
    weight-space method as one class and one registration
    (docs/algorithms.md, section 16).
  - ``train``, ``train_and_evaluate``, ``load_config``, ``ExperimentConfig``:
    the run directories of the command line, from Python.
  - ``build_model``: the built-in networks (small CNN, PreAct ResNet-18,
    WideResNet, the SiLU WideResNet of the weight-averaging recipe).
  - ``tfrobust.extra_data``: pools of generated or pseudo-labelled images
    mixed into every batch (``data.extra_data``), and pseudo-labelling.

Attacks and evaluation
  - ``pgd``, ``fgsm``, ``cross_entropy``, ``cw_margin``: input-space attacks
    on any callable mapping images to logits.
  - ``evaluate``: clean, FGSM, PGD and AutoAttack accuracies with integrity
    checks, in one report.
  - ``run_autoattack``, ``apgd``, ``apgd_targeted``, ``fab_targeted``,
    ``square``: the TensorFlow-native AutoAttack and its components.

Flatness and landscapes (Stutz et al., ICCV 2021)
  - ``robust_loss``, ``average_case_flatness``, ``worst_case_flatness``,
    ``flatness_report``.
  - ``landscape_1d``, ``landscape_2d``, ``random_direction``,
    ``adversarial_direction``, ``plot_landscape_1d``, ``plot_landscape_2d``,
    ``write_landscapes``.
  - ``tfrobust.weight_space``: which weights AWP, RAT and the flatness
    measures perturb, and how perturbations are drawn, projected, applied and
    restored exactly; ``tfrobust.flatness.FlatnessSettings``: the report's
    settings with the paper's defaults.

Callbacks
  - ``FlatnessMonitor``, ``NonFiniteLossGuard``, ``LearningRateLogger``,
    ``AdversarialExamplesImages``, ``EpochBackup``.

Errors
  - ``UserError``: a mistake in what was asked for, with a one-line message.

The methods, their equations, defaults and every deliberate deviation from the
authors' code are described in docs/algorithms.md; worked examples are in
docs/guide.md. Names are imported on first use, so ``import tfrobust`` alone
does not load TensorFlow.
"""

import importlib

from tfrobust import registration as _registration

__version__ = "0.1.0"

_EXPORTS = {
    "tfrobust.trainer": ("RobustModel", "check_outputs_are_logits"),
    "tfrobust.defenses": ("Defense", "parse_defense", "DEFENSES", "WeightSpaceTerm", "register_term", "Hyperparameter"),
    "tfrobust.config": ("ExperimentConfig", "load_config"),
    "tfrobust.experiment": ("train", "train_and_evaluate"),
    "tfrobust.models": ("build_model",),
    "tfrobust.attacks": ("pgd", "fgsm", "cross_entropy", "cw_margin"),
    "tfrobust.evaluation": ("evaluate",),
    "tfrobust.autoattack": ("run_autoattack", "apgd", "apgd_targeted", "fab_targeted", "square"),
    "tfrobust.flatness": (
        "robust_loss", "average_case_flatness", "worst_case_flatness", "flatness_report", "FlatnessMonitor",
    ),
    "tfrobust.landscape": (
        "landscape_1d", "landscape_2d", "random_direction", "adversarial_direction",
        "plot_landscape_1d", "plot_landscape_2d", "write_landscapes",
    ),
    "tfrobust.callbacks": ("NonFiniteLossGuard", "LearningRateLogger", "AdversarialExamplesImages", "EpochBackup"),
    "tfrobust.errors": ("UserError",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = (
    "attacks", "autoattack", "callbacks", "cli", "config", "data", "defenses", "errors", "evaluation", "extra_data",
    "experiment", "flatness", "integrity", "landscape", "loading", "models", "multiworker", "trainer", "weight_space",
)

# The names above, then the submodules (so that documentation generators list them too).
__all__ = sorted(_WHERE) + ["__version__"] + [m for m in _SUBMODULES if m != "cli"]


# Keras' load_model finds RobustModel after ``import tfrobust`` alone (tfrobust.registration).
_registration.install()


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"tfrobust.{name}")
    raise AttributeError(f"module 'tfrobust' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
