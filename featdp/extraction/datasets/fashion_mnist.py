"""Fashion-MNIST from its IDX files, as Debian's `dataset-fashion-mnist` package installs them.

The directory is, in order: the `data_dir` argument, $FEATDP_FASHION_MNIST_DIR, or the Debian location.
Each file may be gzip-compressed (`.gz`, as Debian ships it) or not. A split's two files are read and
checked once, on its first example, and kept in memory (47 MB for both splits).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from featdp.checksums import file_sha256
from featdp.extraction.datasets import idx
from featdp.extraction.datasets.base import DatasetError, SourceBase, SplitInfo

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "FEATDP_FASHION_MNIST_DIR"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# split -> file name prefix, as in the original release ("t10k" is the test set).
_PREFIXES = {"train": "train", "test": "t10k"}


def resolve_dir(data_dir: str | os.PathLike | None) -> tuple[pathlib.Path, str]:
    """The directory to read, and where that choice came from (for error messages)."""
    if data_dir is not None:
        return pathlib.Path(data_dir), "--data-dir"
    if os.environ.get(ENV_VAR):
        return pathlib.Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    return pathlib.Path(DEBIAN_DIR), "the Debian package's location"


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


class FashionMnist(SourceBase):
    _TRANSIENT = ("_arrays",)

    def __init__(self, spec: str, directory: pathlib.Path, files: dict[str, tuple[pathlib.Path, ...]]):
        self.directory = directory
        self.files = files
        splits = []
        for split, (images, labels) in files.items():
            _, image_shape = idx.read_header(images)
            _, label_shape = idx.read_header(labels)
            if len(image_shape) != 3 or len(label_shape) != 1 or image_shape[0] != label_shape[0]:
                raise DatasetError(
                    f"{spec}: {images.name} {image_shape} and {labels.name} {label_shape} do not hold "
                    "n images (n, H, W) and n labels (n,)"
                )
            splits.append(SplitInfo(split, image_shape[0]))
        super().__init__(spec, CLASS_NAMES, splits)

    def _reset_transient(self) -> None:
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = self._arrays.get(split)
        if arrays is None:
            with self._lock:  # one thread reads the files; the others wait for its arrays
                arrays = self._arrays.get(split)
                if arrays is None:
                    arrays = self._arrays[split] = self._read(split)
        return arrays

    def _read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images_path, labels_path = self.files[split]
        images, labels = idx.read_idx(images_path), idx.read_idx(labels_path)
        if images.dtype != np.uint8 or labels.dtype != np.uint8:
            raise DatasetError(f"{self.spec}: expected uint8 IDX data in {images_path} and {labels_path}")
        if len(images) != self.splits[split] or len(labels) != self.splits[split]:
            raise DatasetError(f"{self.spec}: {images_path} or {labels_path} changed since it was opened")
        bad = np.flatnonzero(labels >= len(CLASS_NAMES))
        if bad.size:
            raise DatasetError(f"{labels_path}: label {labels[bad[0]]} at {bad[0]} is not a class (0-9)")
        return images, labels

    def example(self, split: str, i: int) -> tuple[np.ndarray, int]:
        index = self._check(split, i)
        images, labels = self._load(split)
        return images[index].copy(), int(labels[index])

    def _sha256(self, path: pathlib.Path) -> str:
        try:
            return file_sha256(path)
        except OSError as e:
            raise DatasetError(f"{self.spec}: cannot read {path}: {e.strerror or e}") from e

    def fingerprint(self) -> dict:
        """The SHA-256 of each of the four IDX files, by split."""
        return {
            "source": "fashion_mnist",
            "splits": {
                split: {path.name: self._sha256(path) for path in paths} for split, paths in self.files.items()
            },
        }

    def description(self) -> dict:
        files = {}
        for split, paths in self.files.items():
            for path in paths:
                files[path.name] = {"split": split, "sha256": self._sha256(path)}
        return {
            "source": "fashion_mnist",
            "spec": self.spec,
            "path": str(self.directory.resolve()),
            "splits": dict(self.splits),
            "num_classes": len(self.class_names),
            "files": files,
        }


def open_fashion_mnist(spec: str, data_dir: str | None) -> FashionMnist:
    directory, origin = resolve_dir(data_dir)
    how_to = (
        f"install it with `apt-get install dataset-fashion-mnist` (files go to {DEBIAN_DIR}), or point "
        f"--data-dir or ${ENV_VAR} at a directory holding the four IDX files"
    )
    if not directory.is_dir():
        raise DatasetError(f"{spec}: no Fashion-MNIST directory {directory} (from {origin}); {how_to}")
    files, missing = {}, []
    for split, prefix in _PREFIXES.items():
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        found = [_find(directory, stem) for stem in stems]
        missing += [stem + "[.gz]" for stem, path in zip(stems, found) if path is None]
        files[split] = tuple(found)
    if missing:
        raise DatasetError(f"{spec}: {directory} (from {origin}) lacks {', '.join(missing)}; {how_to}")
    return FashionMnist(spec, directory, files)
