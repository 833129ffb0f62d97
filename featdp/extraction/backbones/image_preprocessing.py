"""Deterministic image preprocessing shared by the backbones: RGB conversion, center
crop + resize, normalisation. Pure numpy/JAX, so results do not depend on Pillow or
OpenCV versions.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_rgb_float", "center_crop_resize", "normalize"]


def as_rgb_float(images: np.ndarray) -> np.ndarray:
    """(H, W) or (..., H, W, C) with C in {1, 3, 4} -> float32 RGB in [0, 1].

    uint8 is scaled by 1/255; floats are taken to be in [0, 1] already (the
    scikit-image / PIL-to-float convention). Other integer types are refused,
    since their range is ambiguous. Alpha is dropped; gray is replicated.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
    else:
        raise TypeError(f"expected uint8 or float pixels, got {images.dtype}")
    if images.ndim == 2:  # a single grayscale image without a channel axis
        images = images[..., None]
    if images.ndim < 3 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected (H, W) or (..., H, W, 1|3|4) pixels, got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images[..., :3]


def _center_crop_box(h: int, w: int, crop_fraction: float) -> tuple[int, int, int]:
    side = max(1, int(crop_fraction * min(h, w)))
    return (h - side + 1) // 2, (w - side + 1) // 2, side


def center_crop_resize(images: np.ndarray, size: int, crop_fraction: float) -> jnp.ndarray:
    """Square center crop of ``crop_fraction`` x the shorter side, resized to ``size``.

    ``images`` is (..., H, W, C); every image in a batch gets the same box.

    Cropping first and resizing once equals "resize the shorter side to
    size / crop_fraction, then center crop ``size``" but resamples fewer pixels.
    Bicubic with antialiasing, as downscaling photos without it aliases.
    """
    h, w = images.shape[-3:-1]
    top, left, side = _center_crop_box(h, w, crop_fraction)
    crop = jnp.asarray(images[..., top:top + side, left:left + side, :])
    shape = (*crop.shape[:-3], size, size, crop.shape[-1])
    return jax.image.resize(crop, shape, method="cubic", antialias=True)


def normalize(images: jnp.ndarray, mean: Sequence[float], std: Sequence[float]) -> jnp.ndarray:
    """Per-channel ``(x - mean) / std`` on the last axis."""
    return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
