"""The contract every method fulfils, and the registry that makes CLI, API, benchmarks and tests find it.

A method is one file: a frozen dataclass of public hyperparameters, a pure ``dp_event(noise_scale, n)``
describing its releases, and ``fit(data, noise_scale, releaser)`` that returns the head W (d×K). Data and
the randomness come in as arguments; nothing random is stored on the method. The n a method may use —
in its event, its defaults and its arithmetic — is public: `data.public_size`, the released count in a
fit (the true n differs between add-or-remove neighbours and is never used). Hyperparameters that follow
the budget are filled in by ``for_budget(ñ, ε, d)`` before the event is accounted (dp-sgd's
``recipe=auto``): from public values only, so the choice costs no privacy.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

import numpy as np
from dp_accounting import dp_event as events

from featdp import centering
from featdp.data import Preprocessing, TrainingData
from featdp.mechanism import ReleaserInterface

_REGISTRY: dict[str, type["Method"]] = {}


class HyperparameterError(ValueError):
    """An unknown hyperparameter, or a value that cannot be parsed or is out of range."""


@dataclasses.dataclass(frozen=True)
class Method:
    """Hyperparameters shared by all methods: the per-example feature map that bounds ‖x‖ ≤ C."""

    name: ClassVar[str] = ""
    private: ClassVar[bool] = True

    clip_norm: float = 1.0
    normalize: str = "unit"
    center: float = 0.0
    # One line per hyperparameter, for `featdp methods`; each method adds its own (`hyperparameter_help`).
    descriptions: ClassVar[dict[str, str]] = {
        "clip_norm": "C: every feature vector is brought to norm ≤ C, which bounds every sensitivity",
        "normalize": "unit: rescale every vector to norm C; clip: shorten only those longer than C",
        "center": "share of the budget spent on releasing the train rows' mean, which every row is then "
                  "centred on (featdp/centering.py); 0: off",
    }

    def __post_init__(self):
        finite_floats(self)
        Preprocessing(self.clip_norm, self.normalize)  # validates clip_norm and normalize
        centering.check_share(self.center)

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.clip_norm, self.normalize)

    def for_budget(self, num_examples: float, epsilon: float, feature_dim: int) -> "Method":
        """The method a fit at this budget runs: `self`, unless a hyperparameter is chosen from the budget.
        Every argument is public: `num_examples` the released count, `epsilon` the method's share of the
        target, d the feature dimension. (Not K: without declared classes it comes from the labels.)
        Fits, selections and audits call it before `dp_event`."""
        return self

    def dp_event(self, noise_scale: float, num_examples: int) -> events.DpEvent:
        raise NotImplementedError

    def fit(self, data: TrainingData, noise_scale: float, releaser: ReleaserInterface) -> np.ndarray:
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def changed_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters that differ from the method's defaults (what `--set` or a recipe chose)."""
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        return {k: v for k, v in self.hyperparameters().items() if defaults.get(k) != v}

    @classmethod
    def hyperparameter_help(cls) -> dict[str, str]:
        """Every hyperparameter (dataclass field) with its one-line description, "" where none is given."""
        merged: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("descriptions", {}))
        return {field.name: merged.get(field.name, "") for field in dataclasses.fields(cls)}

    @classmethod
    def tuning_grid(cls, num_examples: int) -> tuple[dict[str, Any], ...]:
        """Hyperparameter candidates a benchmark may choose among on held-out data; the defaults come
        first. Kept to a few entries: every candidate costs one fit per ε."""
        return ({},)

    @classmethod
    def from_strings(cls, overrides: dict[str, str]) -> "Method":
        """Builds the method from ``--set key=value`` strings, parsed by each field's declared type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for key, text in overrides.items():
            if key not in fields:
                raise HyperparameterError(
                    f"unknown hyperparameter {key!r} for method {cls.name!r}; "
                    f"valid: {', '.join(sorted(fields))}"
                )
            values[key] = _parse(text, hints[key], key)
        return cls.create(**values)

    @classmethod
    def create(cls, **values) -> "Method":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise HyperparameterError(
                f"unknown hyperparameter {unknown[0]!r} for method {cls.name!r}; valid: {', '.join(sorted(names))}"
            )
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise HyperparameterError(f"method {cls.name!r}: {error}") from error


def _parse(text: str, annotation, key: str):
    if not isinstance(text, str):
        return text
    options = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    if type(None) in typing.get_args(annotation) and text.lower() in ("none", "null", ""):
        return None
    for kind in options:
        try:
            if kind is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(text)
            return kind(text)
        except (TypeError, ValueError):
            continue
    raise HyperparameterError(f"cannot parse {key}={text!r} as {annotation}")


def register(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def finite_floats(method: Method) -> None:
    """Every real-valued hyperparameter is a finite number: an infinite or NaN one (`--set lr=inf`) is
    refused when the method is built, not found after the fit as a non-finite head or sensitivity."""
    for field in dataclasses.fields(method):
        value = getattr(method, field.name)
        if isinstance(value, (float, np.floating)) and not math.isfinite(value):
            raise ValueError(f"{field.name} must be a finite number, got {value}")


def positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
