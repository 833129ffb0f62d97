"""Augmented views of a prepared image, for `featdp extract --views N` (augmentation multiplicity).

A view is the backbone's prepared uint8 image (what `Backbone.prepare` returns: (R, R, 3) for every
registered backbone, ScatterNet's gray 28×28 included) transformed as De et al. (2022) augment CIFAR-10:

* view 0 is the prepared image itself, unchanged, so a view file's view 0 is the row a one-view extraction
  writes;
* view v ≥ 1 is flipped left–right with probability 1/2 (unless flips are off), then translated by
  (dy, dx), each drawn uniformly from the integers in [−s, s], with reflect padding (pixels beyond the edge
  mirror the image, edge not repeated): CIFAR's "pad 4 and crop 32" at R = 32. By default s =
  `max_shift_for(R)` = max(1, round(R/8)), halves rounded up: 4 px at R = 28 or 32, 28 px at R = 224.
  Both are choices of the extraction (`--augment-shift`, `--no-augment-flip`), recorded in the file.

The randomness is not privacy noise. It is public and reproducible: every draw comes from a generator
seeded by (augment seed, split name, the prepared image's content, view), so a view never depends on which
process, batch or resumed run computes it (a resumed or sharded extraction writes exactly the rows of an
uninterrupted one), nor on the example's position: adding or removing one image of the source changes the
views of that image only, so neighbouring source datasets give feature files that differ in one example,
which is what stage two's guarantee is about. Privacy comes from stage two, which treats an example's V
rows as one record.

numpy only: this runs in loader worker processes (`featdp.extraction.loading`), which must not import JAX.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

FLIP_PROBABILITY = 0.5
PADDING = "reflect"
# Separates these draws from any other use of the same seed.
_DOMAIN = int.from_bytes(b"featdp augment v2", "big")


def max_shift_for(image_size: int) -> int:
    """The largest translation, in pixels per axis, for R × R images: max(1, round(R / 8)), halves rounded
    up (Python's round() would take 20 px to 2 and 36 px to 4; integer arithmetic says what it does)."""
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"image_size={image_size} must be >= 1")
    return max(1, (image_size + 4) // 8)


def view_rng(seed: int, split: str, image: np.ndarray, view: int) -> np.random.Generator:
    """The generator of one view's draws: a function of (seed, split, the image's content, view) only."""
    # The split name enters as 128 bits of its SHA-256: Python's hash() of a string differs per process.
    split_key = int.from_bytes(hashlib.sha256(split.encode("utf-8")).digest()[:16], "big")
    image = np.ascontiguousarray(image)
    content = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode() + image.tobytes()).digest()
    content_key = int.from_bytes(content[:16], "big")
    return np.random.default_rng(np.random.SeedSequence([_DOMAIN, int(seed), split_key, content_key, int(view)]))


def augment_view(image: np.ndarray, view: int, *, seed: int, split: str, max_shift: int,
                 flip: bool = True) -> np.ndarray:
    """View `view` of a prepared image of `split` (module docstring): the image
    itself for view 0; for view ≥ 1 a flip (p = 1/2; never with `flip` False) and a translation of at most
    `max_shift` pixels per axis with reflect padding, as a new (H, W[, C]) array of the image's dtype and
    shape. The draws are the same whether or not flips are on, so `flip` changes nothing else."""
    image = np.asarray(image)
    view, max_shift = int(view), int(max_shift)
    if view < 0:
        raise ValueError(f"view={view} must be >= 0")
    if image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {image.shape}")
    if view == 0:
        return image
    if max_shift < 0:
        raise ValueError(f"max_shift={max_shift} must be >= 0")
    rng = view_rng(seed, split, image, view)
    flipped = rng.random() < FLIP_PROBABILITY and flip
    dy, dx = rng.integers(-max_shift, max_shift, size=2, endpoint=True)
    if flipped:
        image = image[:, ::-1]
    height, width = image.shape[:2]
    pad = [(max_shift, max_shift), (max_shift, max_shift)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode=PADDING)
    # out[y, x] = image[y + dy, x + dx], mirrored where that falls outside the image.
    top, left = max_shift + dy, max_shift + dx
    return np.ascontiguousarray(padded[top : top + height, left : left + width])


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """`views` views per example of the splits named in `splits` (module docstring); picklable, for the
    loader workers. `views_for(image, split)` gives all of an example's views, view 0 first."""

    views: int
    seed: int
    max_shift: int
    splits: tuple[str, ...] = ("train",)
    flip: bool = True

    def __post_init__(self):
        for name, value, low in (("views", self.views, 1), ("seed", self.seed, 0), ("max_shift", self.max_shift, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")

    def views_of(self, split: str) -> int:
        """Views per example of `split`: `views` for the augmented splits, 1 for the others."""
        return self.views if split in self.splits else 1

    def views_for(self, image: np.ndarray, split: str) -> np.ndarray:
        """All views of one example's prepared image, stacked: (views_of(split), *image.shape)."""
        return np.stack([
            augment_view(image, v, seed=self.seed, split=split, max_shift=self.max_shift,
                         flip=self.flip)
            for v in range(self.views_of(split))
        ])

    def describe(self) -> dict:
        """The provenance recorded in the feature file's `preprocessing` metadata (key "augmentation")."""
        return {"views": int(self.views), "splits": list(self.splits), "seed": int(self.seed),
                "flip": FLIP_PROBABILITY if self.flip else 0.0, "max_shift": int(self.max_shift), "padding": PADDING,
                "draws": "seed, split, image content, view"}
