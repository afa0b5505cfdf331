"""The settings of RobustModel's train and test steps, as one frozen, validated value.

Made once (from keywords, from a saved model's config, or from a run's
:class:`~tfrobust.config.ExperimentConfig`), checked where it is made, then
only read: :class:`~tfrobust.trainer.RobustModel` keeps it whole and saves it
field by field. A new setting is one field here, with its check.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tfrobust.config import WEIGHT_DECAY_EXCLUDE
from tfrobust.step.attack import single_step_base
from tfrobust.errors import UserError, check_number, check_steps

NORMS = ("linf", "l2")
BN_MODES = ("eval", "train")
EVAL_LOSSES = ("ce", "cw")


def _choice(name, value, allowed):
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; allowed: {', '.join(sorted(allowed))}")
    return value


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The training attack, the validation attack and the optimisation details of the step.

    Fields:
      eps, step_size, steps: the training attack (PGD).
      norm: ``"linf"`` or ``"l2"``.
      bn_mode: BatchNorm mode during the attack: ``"eval"`` or ``"train"``
        (in both, the moving statistics are left exactly as they were).
      steps_per_epoch: optimizer steps per epoch, which turns a warm-up in
        epochs (AWP) into steps.
      weight_decay: L2 penalty ``wd/2 ||w||^2`` added to the loss (as PyTorch
        SGD's weight_decay; with AWP taken at the perturbed weights).
      eval_steps, eval_step_size: PGD of the test step (step size default
        ``eps / 4``, see :attr:`validation_step_size`).
      seed: base seed of every random draw in the step.
      eval_loss: the loss PGD ascends in the test step: ``"ce"`` or ``"cw"``.
      label_smoothing: ``s`` in ``(1 - s) CE + s mean_k(-log p_k)``, the CE
        term of AT (adversarial) and TRADES (clean); MART has none.
      ema_decay: the decay ``tau`` of the weight average, or None for none.
      ema_start_step: optimizer steps before the average starts.
      weight_decay_exclude: ``"none"``, ``"batchnorm"`` or ``"batchnorm_and_bias"``.
      accumulate_steps: micro-batches per optimizer update (1: the plain step).
      allow_unlabelled: accept examples labelled -1 (TRADES's KL term only).
      train_clean_accuracy: report the clean accuracy of the training
        batches; for AT it costs one inference-mode pass per step (TRADES and
        MART take it from their own forward pass).
    """

    eps: float
    step_size: float
    steps: int
    norm: str = "linf"
    bn_mode: str = "eval"
    steps_per_epoch: Optional[int] = None
    weight_decay: float = 0.0
    eval_steps: int = 20
    eval_step_size: Optional[float] = None
    seed: int = 0
    eval_loss: str = "ce"
    label_smoothing: float = 0.0
    ema_decay: Optional[float] = None
    ema_start_step: float = 0.0
    weight_decay_exclude: str = "none"
    accumulate_steps: int = 1
    allow_unlabelled: bool = False
    train_clean_accuracy: bool = True

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        set_("eps", float(check_number("eps", self.eps)))
        set_("step_size", float(check_number("step_size", self.step_size)))
        set_("steps", int(check_steps("steps", self.steps)))
        set_("eval_steps", int(check_steps("eval_steps", self.eval_steps)))
        _choice("norm", self.norm, NORMS)
        _choice("bn_mode", self.bn_mode, BN_MODES)
        _choice("eval_loss", self.eval_loss, EVAL_LOSSES)
        _choice("weight_decay_exclude", self.weight_decay_exclude, WEIGHT_DECAY_EXCLUDE)
        if self.steps_per_epoch is not None:
            set_("steps_per_epoch", check_steps("steps_per_epoch", self.steps_per_epoch, minimum=1, maximum=2**31 - 1))
        set_("weight_decay", float(self.weight_decay))
        if self.eval_step_size is not None:
            set_("eval_step_size", float(self.eval_step_size))
        set_("seed", int(self.seed))
        set_("label_smoothing", float(self.label_smoothing))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.ema_decay is not None:
            set_("ema_decay", float(self.ema_decay))
            if not 0.0 <= self.ema_decay < 1.0:
                raise UserError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        set_("ema_start_step", float(self.ema_start_step))
        if self.ema_start_step < 0:
            raise UserError(f"ema_start_step must be >= 0, got {self.ema_start_step!r}")
        set_("accumulate_steps", check_steps("accumulate_steps", self.accumulate_steps, minimum=1))
        set_("allow_unlabelled", bool(self.allow_unlabelled))
        set_("train_clean_accuracy", bool(self.train_clean_accuracy))

    @property
    def validation_step_size(self) -> float:
        """The test step's PGD step size: ``eval_step_size``, or ``eps / 4``."""
        return self.eval_step_size if self.eval_step_size is not None else self.eps / 4.0

    def check_for(self, defense, terms) -> None:
        """Refuses (one-line UserError) settings the defense cannot use."""
        for term in terms:
            if term.warmup_epochs() > 0 and self.steps_per_epoch is None:
                raise UserError(
                    f"defense {defense.name!r} has an {term.name.upper()} warm-up of {term.warmup_epochs()} epochs: "
                    f"pass steps_per_epoch=... (optimizer steps per epoch), or no warm-up: "
                    f"Defense({defense.name!r}, {term.name}_warmup_epochs=0)"
                )
        if single_step_base(defense.objective) and self.norm != "linf":
            raise UserError(f"defense {defense.name!r} trains on a single L-inf step: attack.norm must be linf")
        if self.label_smoothing and defense.objective.CE_TERM is None:
            raise UserError(f"label smoothing applies to the CE term of at and trades; {defense.base} has none")
        if self.allow_unlabelled and not defense.accepts_unlabelled:
            raise UserError(
                f"unlabelled examples enter only TRADES's KL term, which defense {defense.name!r} does not have in a "
                "form that needs no label: use trades or trades+awp, or pseudo-label them (pseudo_label.py)"
            )

    def to_config(self) -> dict:
        """The fields as plain values (what ``RobustModel.get_config`` saves)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_experiment(cls, config, steps_per_epoch: int, allow_unlabelled: bool = False) -> "StepSettings":
        """The settings of a run's :class:`~tfrobust.config.ExperimentConfig` (its attack, optim and eval sections)."""
        attack, optim, evaluation = config.attack, config.optim, config.eval
        return cls(
            eps=attack.eps, step_size=attack.step_size, steps=attack.steps, norm=attack.norm, bn_mode=attack.bn_mode,
            steps_per_epoch=steps_per_epoch, weight_decay=optim.weight_decay, eval_steps=evaluation.pgd_steps,
            eval_step_size=evaluation.step_size, seed=config.runtime.seed, eval_loss=evaluation.pgd_loss,
            label_smoothing=config.defense.label_smoothing,
            ema_decay=optim.ema_decay if optim.ema else None,
            ema_start_step=optim.ema_start * optim.epochs * steps_per_epoch,
            weight_decay_exclude=optim.weight_decay_exclude, accumulate_steps=optim.accumulate_steps,
            allow_unlabelled=allow_unlabelled, train_clean_accuracy=evaluation.train_clean_accuracy,
        )


FIELDS = tuple(f.name for f in dataclasses.fields(StepSettings))

__all__ = ["StepSettings", "FIELDS", "NORMS", "BN_MODES", "EVAL_LOSSES"]
