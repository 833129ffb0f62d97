"""One image file -> uint8 array with Pillow: gray stays (H, W), colour becomes (H, W, 3), alpha is dropped."""

from __future__ import annotations

import pathlib
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

from featdp.extraction.datasets.base import DatasetError

EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_GRAY = {"1": "L", "L": "L", "LA": "L", "La": "L"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def is_image_file(name: str) -> bool:
    return pathlib.PurePath(name).suffix.lower() in EXTENSIONS


def _to_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in _GRAY:
        return np.asarray(image.convert(_GRAY[mode]))
    if mode in _SIXTEEN_BIT:
        # 16-bit gray (PNG, TIFF): keep the 8 high bits, a fixed scale rather than one per image.
        return (np.clip(np.asarray(image, np.int64), 0, 65535) >> 8).astype(np.uint8)
    if mode == "RGB":
        return np.asarray(image)
    if mode in ("P", "PA"):
        # Via RGBA: Pillow warns when a palette with transparency goes straight to RGB.
        return np.asarray(image.convert("RGBA"))[..., :3]
    if mode in ("F", "I;16S", "I;32", "I;32S"):
        raise ValueError(f"unsupported pixel mode {mode} (floating or 32-bit); convert the file to 8 bits")
    return np.asarray(image.convert("RGB"))  # RGBA, RGBX, CMYK, YCbCr, LAB, HSV


def decode_file(path: str | pathlib.Path) -> np.ndarray:
    """Decodes the first frame of `path`, pixels as stored (no EXIF rotation, like TF's and torchvision's
    decoders). Any failure, a truncated file included, raises `DatasetError` naming the file."""
    return decode(path, str(path))


def decode(source, name: str, *, upright: bool = False, mode: str | None = None) -> np.ndarray:
    """Decodes the first frame of `source` (a path or a binary file object) as `decode_file` does; `name`
    says which image it is in errors. `upright` applies the EXIF orientation and `mode` converts to that
    Pillow mode first, as Hugging Face `datasets` does for its Image feature."""
    try:
        with warnings.catch_warnings():
            # A very large image is a warning in Pillow; here it is one more image (bombs still raise).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                image.load()  # decode now: a truncated file fails here, inside the try
                if upright and image.getexif().get(ExifTags.Base.Orientation) is not None:
                    image = ImageOps.exif_transpose(image)
                if mode and image.mode != mode:
                    image = image.convert(mode)
                array = _to_array(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot decode image {name}: {e}") from e
    if array.ndim < 2 or min(array.shape[:2]) < 1:
        raise DatasetError(f"cannot decode image {name}: empty image of shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.uint8)
