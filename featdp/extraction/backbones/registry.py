"""Backbones by name. A backbone module registers a `BackboneSpec`; `featdp extract` and
`featdp backbones` find it here, so adding a backbone is one new module in this package.

The split of work is what keeps accelerators busy: `prepare` runs per image on CPU loader workers and
returns a fixed-size uint8 (R, R, 3) array (4× less to transfer than float32); `apply` is a pure,
jit-compiled function of (variables, uint8 batch) that normalizes on the device and returns pooled
features (N, D).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import numpy as np


class BackboneError(ValueError):
    """Unknown backbone, missing or mismatched checkpoint."""


@dataclasses.dataclass
class Backbone:
    """A loaded backbone: weights plus the two functions the runner calls."""

    name: str
    feature_dim: int
    image_size: int
    variables: Any
    apply: Callable[[Any, Any], Any]  # (variables, uint8 (N, R, R, 3)) -> float (N, D); pure, jittable
    prepare: Callable[[np.ndarray], np.ndarray]  # one decoded image -> uint8 (R, R, 3); numpy/Pillow only
    checkpoint: str
    checkpoint_sha256: str
    preprocessing: dict  # JSON-able description, recorded in the feature file


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    image_size: int
    checkpoint_source: str  # where the default weights come from, for `featdp backbones`
    load: Callable[[str | None], Backbone]  # checkpoint path (None: the default) -> Backbone


_SPECS: dict[str, BackboneSpec] = {}
_DISCOVERED = False


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _SPECS:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _SPECS[spec.name] = spec
    return spec


def _discover() -> None:
    global _DISCOVERED
    if not _DISCOVERED:
        import featdp.extraction.backbones as package

        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package.__name__}.{module.name}")
        _DISCOVERED = True


def backbone_specs() -> dict[str, BackboneSpec]:
    _discover()
    return dict(sorted(_SPECS.items()))


def get_backbone_spec(name: str) -> BackboneSpec:
    specs = backbone_specs()
    if name not in specs:
        raise BackboneError(f"unknown backbone {name!r}; available: {', '.join(specs)}")
    return specs[name]


def load_backbone(name: str, checkpoint: str | None = None) -> Backbone:
    return get_backbone_spec(name).load(checkpoint)
