"""tfrobust: adversarial training in weight space (AWP, S2O, RAT with AT, TRADES, MART) for Keras.

The top level holds the main classes and functions (``import tfrobust as tr``):

- ``RobustModel(network, defense, eps=..., step_size=..., steps=...)`` (or
  ``settings=StepSettings(...)``): a ``keras.Model`` whose ``train_step``
  performs adversarial training of any Keras network mapping images in
  [0, 1] to logits;
- ``Defense("trades+awp", awp_gamma=0.005)``: a defense from its name with
  keyword overrides; ``WeightSpaceTerm``, ``register_term``,
  ``Hyperparameter`` and ``register_base``: a new weight-space method or
  base objective from outside the package;
- ``train``, ``train_and_evaluate``, ``load_config``, ``ExperimentConfig``:
  the run directories of the command line, from Python; ``build_model``:
  the built-in networks;
- ``evaluate``: clean, FGSM, PGD and AutoAttack accuracies with integrity
  checks; ``run_autoattack``: the TensorFlow-native AutoAttack;
  ``flatness_report``: the flatness measures of Stutz et al. (ICCV 2021);
- ``UserError``: a mistake in what was asked for, with a one-line message.

The rest lives in documented submodules: ``tr.attacks`` (``pgd``, ``fgsm``,
losses), ``tr.autoattack`` (its components), ``tr.flatness``
(``robust_loss``, ``average_case_flatness``, ``worst_case_flatness``,
``FlatnessMonitor``), ``tr.landscape``, ``tr.callbacks``, ``tr.defenses``,
``tr.weight_space``, ``tr.extra_data``, ``tr.data``, ``tr.step``. Names
imported on first use, so ``import tfrobust`` alone does not load
TensorFlow; it registers ``RobustModel`` with Keras, so that
``keras.models.load_model`` finds it in any process.
"""

import importlib

from tfrobust import registration as _registration

__version__ = "0.1.0"

_EXPORTS = {
    "tfrobust.trainer": ("RobustModel", "StepSettings"),
    "tfrobust.defenses": ("Defense", "WeightSpaceTerm", "register_term", "Hyperparameter", "register_base"),
    "tfrobust.config": ("ExperimentConfig", "load_config"),
    "tfrobust.experiment": ("train", "train_and_evaluate"),
    "tfrobust.models": ("build_model",),
    "tfrobust.evaluation": ("evaluate",),
    "tfrobust.autoattack": ("run_autoattack",),
    "tfrobust.flatness": ("flatness_report",),
    "tfrobust.errors": ("UserError",),
}
# Names the top level held before it kept to the main ones: still found there, with a warning naming their module.
_MOVED = {
    "tfrobust.trainer": ("check_outputs_are_logits",),
    "tfrobust.defenses": ("parse_defense", "DEFENSES"),
    "tfrobust.attacks": ("pgd", "fgsm", "cross_entropy", "cw_margin"),
    "tfrobust.autoattack": ("apgd", "apgd_targeted", "fab_targeted", "square"),
    "tfrobust.flatness": ("robust_loss", "average_case_flatness", "worst_case_flatness", "FlatnessMonitor"),
    "tfrobust.landscape": (
        "landscape_1d", "landscape_2d", "random_direction", "adversarial_direction",
        "plot_landscape_1d", "plot_landscape_2d", "write_landscapes",
    ),
    "tfrobust.callbacks": ("NonFiniteLossGuard", "LearningRateLogger", "AdversarialExamplesImages", "EpochBackup"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_MOVED_TO = {name: module for module, names in _MOVED.items() for name in names}
_SUBMODULES = (
    "attacks", "autoattack", "callbacks", "cli", "collapse", "config", "config_files", "data", "data_sources", "defenses", "errors",
    "evaluation", "experiment", "export", "extra_data", "flatness", "integrity", "landscape", "loading", "models",
    "multiworker", "network_checks", "placement", "runtime", "step", "trainer", "weight_space", "zoo",
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
    if name in _MOVED_TO:
        import warnings

        warnings.warn(f"tfrobust.{name} is {_MOVED_TO[name]}.{name}; the top level keeps the main classes and "
                      "functions", FutureWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED_TO[name]), name)
    raise AttributeError(f"module 'tfrobust' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | set(_SUBMODULES))
