"""Images in folders: PATH/<split>/<class>/<image files>.

* Splits are PATH's subfolders; the classes are the sorted union of class folder names over all splits,
  so a label means the same class in every split (a class may be missing from a split).
* Within a split, examples go class by class, and within a class by sorted relative path (subfolders of
  a class folder are searched too), so example i is the same file on every run and every machine.
* Only files with an image extension are examples (jpg, jpeg, png, bmp, gif, webp, tif, tiff, in any
  case); other files, and names starting with "." (e.g. macOS "._x.jpg" resource forks), are ignored.
* A file that does not decode (truncated, corrupt) raises `DatasetError` naming it, when it is read:
  skipping it would shift every later index and break resuming. Remove the file, or catch the error.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import pathlib

import numpy as np

from featdp.extraction.datasets.base import DatasetError, SourceBase, SplitInfo
from featdp.extraction.datasets.pil_decode import EXTENSIONS, decode_file, is_image_file

LAYOUT = "expected PATH/<split>/<class>/<image files>"


def _subfolders(path: pathlib.Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: pathlib.Path) -> list[str]:
    """Relative POSIX paths of the images under `class_dir`, sorted."""
    found = []
    # Symlinked subfolders are not followed (a link cycle would never end); the class folder itself may be one.
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = pathlib.Path(root).relative_to(class_dir)
        found += [(rel / f).as_posix() for f in files if not f.startswith(".") and is_image_file(f)]
    return sorted(found)


class _Split:
    """A split's files, grouped by class: index i -> (class, file) through cumulative counts."""

    def __init__(self, classes: list[int], files: list[list[str]]):
        self.classes = classes
        self.files = files
        self.ends = np.cumsum([len(f) for f in files]).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def locate(self, i: int) -> tuple[int, str]:
        group = bisect.bisect_right(self.ends, i)
        start = self.ends[group - 1] if group else 0
        return self.classes[group], self.files[group][i - start]


class FolderDataset(SourceBase):
    def __init__(self, spec: str, root: pathlib.Path):
        self.root = root
        split_names = _subfolders(root)
        if not split_names:
            raise DatasetError(f"{spec}: {root} has no split folders; {LAYOUT}")
        class_dirs = {split: _subfolders(root / split) for split in split_names}
        for split, names in class_dirs.items():
            if not names:
                loose = any(is_image_file(f) for f in os.listdir(root / split))
                hint = " (it holds images directly: is PATH a split folder?)" if loose else ""
                raise DatasetError(f"{spec}: split folder {root / split} has no class folders{hint}; {LAYOUT}")
        class_names = sorted(set().union(*class_dirs.values()))
        label_of = {name: label for label, name in enumerate(class_names)}
        self._splits = {}
        for split, names in class_dirs.items():
            files = [_image_files(root / split / name) for name in names]
            self._splits[split] = _Split([label_of[name] for name in names], files)
            if not len(self._splits[split]):
                raise DatasetError(
                    f"{spec}: split folder {root / split} holds no images "
                    f"({', '.join(sorted(e[1:] for e in EXTENSIONS))}); {LAYOUT}"
                )
        super().__init__(spec, class_names, [SplitInfo(s, len(v)) for s, v in self._splits.items()])

    def path(self, split: str, i: int) -> pathlib.Path:
        """The file behind example i of `split`."""
        return self._locate(split, i)[1]

    def _locate(self, split: str, i: int) -> tuple[int, pathlib.Path]:
        index = self._check(split, i)
        label, rel = self._splits[split].locate(index)
        return label, self.root / split / self.class_names[label] / rel

    def example(self, split: str, i: int) -> tuple[np.ndarray, int]:
        label, path = self._locate(split, i)
        return decode_file(path), label

    def fingerprint(self) -> dict:
        """Per split: the number of files and their total size, a digest of the ordered file list (which
        fixes what example i is), and a digest of every file's size and modification time (which changes
        when a file is replaced or rewritten). Stat only: no image is read."""
        splits = {}
        for split, s in self._splits.items():
            names, stats, total = hashlib.sha256(), hashlib.sha256(), 0
            for label, files in zip(s.classes, s.files):
                for rel in files:
                    path = self.root / split / self.class_names[label] / rel
                    try:
                        info = os.stat(path)  # follows a symlink: the file whose pixels are read
                    except OSError as e:
                        raise DatasetError(f"{self.spec}: cannot stat {path}: {e.strerror or e}") from e
                    names.update(f"{self.class_names[label]}/{rel}\n".encode())
                    stats.update(f"{info.st_size} {info.st_mtime_ns}\n".encode())
                    total += info.st_size
            splits[split] = {
                "files": len(s),
                "bytes": total,
                "file_list_sha256": names.hexdigest(),
                "sizes_and_mtimes_sha256": stats.hexdigest(),
            }
        return {"source": "folder", "splits": splits}

    def description(self) -> dict:
        # A digest of the ordered file list: a resumed run can tell that the folder still has the same order.
        digests = {}
        for split, s in self._splits.items():
            h = hashlib.sha256()
            for label, files in zip(s.classes, s.files):
                for rel in files:
                    h.update(f"{self.class_names[label]}/{rel}\n".encode())
            digests[split] = h.hexdigest()
        return {
            "source": "folder",
            "spec": self.spec,
            "path": str(self.root),
            "splits": dict(self.splits),
            "num_classes": len(self.class_names),
            "file_list_sha256": digests,
        }


def open_folder(spec: str, path: str, data_dir: str | None) -> FolderDataset:
    """`folder:PATH`; a relative PATH is taken under `data_dir` when one is given."""
    if not path:
        raise DatasetError(f"{spec}: give a folder, as folder:PATH ({LAYOUT})")
    root = pathlib.Path(path).expanduser()
    if data_dir is not None and not root.is_absolute():
        root = pathlib.Path(data_dir) / root
    if not root.is_dir():
        raise DatasetError(f"{spec}: {root} is not a directory; {LAYOUT}")
    return FolderDataset(spec, root.resolve())
