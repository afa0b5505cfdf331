"""The settings of :func:`tfrobust.flatness.flatness_report`: typed, with the reference's defaults, validated once.

:class:`FlatnessSettings` holds the report-wide values (``examples``,
``batch_size``, ``step_size``, ``steps``, ``restarts``, ``measures``) and one
settings object per measure:

  - ``average``: :class:`AverageCaseSettings` (robust, (F2)): ``xi`` 0.5,
    ``samples`` 10, and the attack of the robust loss;
  - ``average_clean``: :class:`AverageCaseCleanSettings`: ``xi`` 0.5,
    ``samples`` 50;
  - ``worst``: :class:`WorstCaseSettings` (robust, (F3)): ``xi`` 0.00075,
    ``attempts`` 10, ``passes`` 20, ``weight_step`` 0.01, and the attack;
  - ``worst_clean``: :class:`WorstCaseCleanSettings`: the same without attack.

A per-measure ``batch_size``, ``step_size``, ``steps`` or ``restarts`` left at
``None`` takes the report-wide value; a ``step_size`` of ``None`` everywhere
means the reference's ratio to eps (:func:`tfrobust.flatness.resolve_step_size`).
These are the defaults of Stutz et al. (ICCV 2021), except ``restarts`` (1
here, 10 in the reference; see :func:`tfrobust.flatness.robust_loss`).

:meth:`FlatnessSettings.from_mapping` reads the mapping users write (YAML,
JSON, ``settings=`` of ``flatness_report``), refusing unknown names with a
one-line ``UserError``; :meth:`FlatnessSettings.resolved` fills the inherited
values for an eps and checks every value once, and :meth:`~FlatnessSettings.as_dict`
gives the JSON form stored in the report. :data:`REPORT_DEFAULTS` is the
mapping form of the defaults. :func:`check_average_case` and
:func:`check_worst_case` are the range checks shared with the measures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple, Union

from tfrobust.errors import UserError, unknown_choice
from tfrobust.flatness.loss import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STEPS,
    check_pgd_settings,
    resolve_step_size,
)

__all__ = [
    "MEASURES",
    "AverageCaseSettings",
    "AverageCaseCleanSettings",
    "WorstCaseSettings",
    "WorstCaseCleanSettings",
    "FlatnessSettings",
    "REPORT_DEFAULTS",
    "report_settings",
    "check_average_case",
    "check_worst_case",
]

# The four measures of a report: (F2) and (F3), robust and clean.
MEASURES = ("average", "worst", "average_clean", "worst_clean")


def check_average_case(xi, samples, where: str = "") -> None:
    """One-line ``UserError`` unless ``xi >= 0`` and ``samples >= 1`` (``where`` prefixes the names)."""
    if xi < 0:
        raise UserError(f"{where}xi must be >= 0, got {xi}")
    if int(samples) < 1:
        raise UserError(f"{where}samples must be >= 1, got {samples}")


def check_worst_case(xi, attempts, passes, weight_step, where: str = "") -> None:
    """One-line ``UserError`` unless ``xi >= 0``, ``attempts >= 1``, ``passes >= 0`` and ``weight_step >= 0``."""
    if xi < 0:
        raise UserError(f"{where}xi must be >= 0, got {xi}")
    if int(attempts) < 1:
        raise UserError(f"{where}attempts must be >= 1, got {attempts}")
    if int(passes) < 0:
        raise UserError(f"{where}passes must be >= 0, got {passes}")
    if weight_step < 0:
        raise UserError(f"{where}weight_step must be >= 0, got {weight_step}")


@dataclass(kw_only=True)
class AverageCaseCleanSettings:
    """Clean average-case flatness: ``samples`` directions on the sphere of relative radius ``xi``."""

    xi: float = 0.5
    samples: int = 50
    batch_size: Optional[int] = None


@dataclass(kw_only=True)
class WorstCaseCleanSettings:
    """Clean worst-case flatness: ``attempts`` starts, ``passes`` passes, steps of ``weight_step * ||w_l||``."""

    xi: float = 0.00075
    attempts: int = 10
    passes: int = 20
    weight_step: float = 0.01
    batch_size: Optional[int] = None


@dataclass(kw_only=True)
class _RobustLossAttack:
    """PGD of the robust loss; ``None`` takes the report-wide value."""

    step_size: Optional[float] = None
    steps: Optional[int] = None
    restarts: Optional[int] = None


@dataclass(kw_only=True)
class AverageCaseSettings(_RobustLossAttack, AverageCaseCleanSettings):
    """Robust average-case flatness: as the clean one with 10 samples, plus the robust loss' PGD."""

    samples: int = 10


@dataclass(kw_only=True)
class WorstCaseSettings(_RobustLossAttack, WorstCaseCleanSettings):
    """Robust worst-case flatness: as the clean one, plus the robust loss' PGD."""


_MEASURE_TYPES = {
    "average": AverageCaseSettings,
    "worst": WorstCaseSettings,
    "average_clean": AverageCaseCleanSettings,
    "worst_clean": WorstCaseCleanSettings,
}
_INHERITED = ("batch_size", "step_size", "steps", "restarts")
_INTEGERS = ("examples", "batch_size", "steps", "restarts", "samples", "attempts", "passes")


def _number(name: str, value, where: str):
    """``value`` as an int (integer settings) or float, or a one-line ``UserError``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise UserError(f"flatness setting {where}{name} must be a number, got {value!r}")
    if not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"flatness setting {where}{name} must be a number, got {value!r}") from None
    if name in _INTEGERS:
        if float(value) != int(value):
            raise UserError(f"flatness setting {where}{name} must be a whole number, got {value!r}")
        return int(value)
    return value


@dataclass(kw_only=True)
class FlatnessSettings:
    """Everything :func:`tfrobust.flatness.flatness_report` measures with (Stutz et al., ICCV 2021 defaults).

    Attributes:
      examples: the first ``examples`` examples are evaluated (None: all).
      batch_size, step_size, steps, restarts: the report-wide defaults of
        every measure (``step_size=None``: the reference's ratio to eps).
      measures: which of ``average``, ``worst``, ``average_clean``,
        ``worst_clean`` to compute.
      average, worst, average_clean, worst_clean: each measure's settings.
    """

    examples: Optional[int] = 1000
    batch_size: int = DEFAULT_BATCH_SIZE
    step_size: Optional[float] = None
    steps: int = DEFAULT_STEPS
    restarts: int = 1
    measures: Tuple[str, ...] = MEASURES
    average: AverageCaseSettings = field(default_factory=AverageCaseSettings)
    worst: WorstCaseSettings = field(default_factory=WorstCaseSettings)
    average_clean: AverageCaseCleanSettings = field(default_factory=AverageCaseCleanSettings)
    worst_clean: WorstCaseCleanSettings = field(default_factory=WorstCaseCleanSettings)

    @classmethod
    def from_mapping(cls, settings: Optional[Mapping] = None) -> "FlatnessSettings":
        """The defaults overridden by a mapping such as ``{"examples": 500, "average": {"samples": 5}}``.

        Unknown names, a measure's setting that is not a mapping, and
        non-numeric values raise a one-line ``UserError``.
        """
        top = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, value in (settings or {}).items():
            if key not in top:
                raise unknown_choice("flatness setting", key, top)
            if key in _MEASURE_TYPES:
                if not isinstance(value, Mapping):
                    raise UserError(f"flatness setting {key!r} must be a mapping")
                kind = _MEASURE_TYPES[key]
                names = [f.name for f in dataclasses.fields(kind)]
                for sub in value:
                    if sub not in names:
                        raise unknown_choice(f"{key} flatness setting", sub, names)
                values[key] = kind(**{k: _number(k, v, f"{key}.") for k, v in value.items()})
            elif key == "measures":
                chosen = [value] if isinstance(value, str) else list(value)
                for m in chosen:
                    if m not in _MEASURE_TYPES:
                        raise unknown_choice("flatness measure", m, _MEASURE_TYPES)
                values[key] = tuple(chosen)
            else:
                values[key] = _number(key, value, "")
        return cls(**values)

    def resolved(self, eps: float) -> "FlatnessSettings":
        """A copy with every inherited value filled in and every step size resolved for ``eps``, checked once.

        Raises a one-line ``UserError`` naming the first bad value.
        """
        if self.examples is not None and int(self.examples) < 1:
            raise UserError(f"examples must be >= 1, got {self.examples}")
        top_step = resolve_step_size(eps, self.step_size)
        if self.batch_size is None or int(self.batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        check_pgd_settings(top_step, self.steps, self.restarts)
        report_wide = {"batch_size": self.batch_size, "step_size": top_step, "steps": self.steps,
                       "restarts": self.restarts}
        measures = {}
        for name, kind in _MEASURE_TYPES.items():
            own = getattr(self, name)
            if not isinstance(own, kind):
                raise UserError(f"flatness setting {name!r} must be a {kind.__name__}")
            changes = {k: report_wide[k] for k in _INHERITED if hasattr(own, k) and getattr(own, k) is None}
            filled = dataclasses.replace(own, **changes)
            if hasattr(filled, "step_size"):
                filled = dataclasses.replace(filled, step_size=resolve_step_size(eps, filled.step_size))
            _check_measure(name, filled)
            measures[name] = filled
        chosen = (self.measures,) if isinstance(self.measures, str) else tuple(self.measures)
        for m in chosen:
            if m not in _MEASURE_TYPES:
                raise unknown_choice("flatness measure", m, _MEASURE_TYPES)
        return dataclasses.replace(self, step_size=top_step, measures=chosen, **measures)

    def as_dict(self) -> Dict:
        """The JSON form: top-level values, ``measures`` as a list and one mapping per measure."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["measures"] = list(self.measures)
        for name in _MEASURE_TYPES:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


def _check_measure(name: str, s) -> None:
    where = f"{name}."
    if s.batch_size is None or int(s.batch_size) < 1:
        raise UserError(f"{where}batch_size must be >= 1, got {s.batch_size}")
    if isinstance(s, _RobustLossAttack):
        check_pgd_settings(s.step_size, s.steps, s.restarts, where)
    if isinstance(s, AverageCaseCleanSettings):
        check_average_case(s.xi, s.samples, where)
    else:
        check_worst_case(s.xi, s.attempts, s.passes, s.weight_step, where)


def _defaults_mapping() -> Dict:
    defaults = FlatnessSettings()
    out = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(defaults) if f.name not in _MEASURE_TYPES}
    out["measures"] = list(defaults.measures)
    for name in _MEASURE_TYPES:
        out[name] = {k: v for k, v in dataclasses.asdict(getattr(defaults, name)).items() if v is not None}
    return out


# The defaults as a mapping (the form ``flatness_report(settings=...)`` overrides).
REPORT_DEFAULTS = _defaults_mapping()


def report_settings(settings: Union[None, Mapping, FlatnessSettings], eps: float) -> FlatnessSettings:
    """``settings`` (None, a mapping or a :class:`FlatnessSettings`) resolved and checked for ``eps``."""
    if not isinstance(settings, FlatnessSettings):
        settings = FlatnessSettings.from_mapping(settings)
    return settings.resolved(eps)
