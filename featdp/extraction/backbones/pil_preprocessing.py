"""CPU-side image preparation for loader workers: to RGB, center crop, resize, as uint8 (Pillow).

Pillow is imported when an image is first prepared, not with the module: the backbone modules reference
these functions at import time, and a machine that only benchmarks the model need not have Pillow.
"""

from __future__ import annotations

import numpy as np


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) uint8 -> (H, W, 3) uint8: gray is replicated, alpha dropped."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W) or (H, W, 1|3|4) image, got shape {image.shape}")
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """The central square of `crop_fraction` × the shorter side, resized to size × size (bicubic)."""
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    side = max(1, int(crop_fraction * min(h, w)))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    from PIL import Image

    crop = Image.fromarray(rgb[top : top + side, left : left + side])
    if side != size:
        # Pillow's bicubic filter widens its support when downscaling, i.e. it antialiases.
        crop = crop.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(crop, dtype=np.uint8)


def resize_squash(image: np.ndarray, size: int) -> np.ndarray:
    """The whole image resized to size × size (bicubic), the aspect ratio not kept: no crop.

    SigLIP's evaluation transform (big_vision `resize(224)`, open_clip `resize_mode="squash"`,
    transformers' `SiglipImageProcessor`), with the bicubic filter of the latter two."""
    from PIL import Image

    rgb = to_rgb_uint8(image)
    if rgb.shape[:2] == (size, size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
