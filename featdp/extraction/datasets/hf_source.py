"""Hugging Face `datasets` datasets: `hf:PATH_OR_NAME[@REVISION][:CONFIG][#image=COLUMN,label=COLUMN]`.

* `hf:PATH` (optionally `:CONFIG`): a local directory. One written by `save_to_disk` is opened with
  `datasets.load_from_disk` (a saved `DatasetDict` gives its splits; a saved `Dataset` is one split,
  named by its recorded split or `train`); any other directory (Parquet/CSV/JSON files, an image folder,
  a downloaded Hub repository) with `datasets.load_dataset(PATH, CONFIG)`. A relative PATH is taken
  from the working directory, as `datasets` does.
* `hf:[ORG/]NAME[@REVISION][:CONFIG]`: a script-less dataset repository on the Hugging Face Hub, the
  syntax of `--checkpoint hf-hub:ORG/NAME[@REVISION]` (REVISION: a branch, tag or commit). With
  `HF_HUB_OFFLINE=1` or `HF_DATASETS_OFFLINE=1` (read when `datasets` is first imported) nothing is
  downloaded: the copy already prepared in the datasets cache is read, and since `datasets` then takes
  the newest cached copy whatever the revision, a REVISION must be that copy's full commit hash.
* `data_dir` is `datasets`' cache directory (`cache_dir`; default `$HF_DATASETS_CACHE`, else
  `~/.cache/huggingface/datasets`), where `load_dataset` writes the Arrow files it prepares.
* The image column is the top-level `datasets.Image` feature (the one named `image` if there are
  several), the label column the top-level `ClassLabel` (or the one named `label`); `#image=COLUMN` and
  `#label=COLUMN` (comma-separated, after everything else) choose others. Class names are the
  ClassLabel's names. Every split is offered, in the dataset's order.
* Examples are read from the dataset's Arrow files with pyarrow (memory-mapped), so loader workers
  import neither `datasets` nor its dependencies. Images are decoded as `datasets` 5 decodes its Image
  feature (EXIF orientation and the feature's `mode` applied), then as in every source: gray (H, W),
  colour (H, W, 3), alpha dropped. An example without a label (-1 or null, as in many unlabelled test
  splits) raises `DatasetError` when it is read.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import re

import numpy as np

from featdp.extraction.datasets.base import DatasetError, SourceBase, SplitInfo
from featdp.extraction.datasets.pil_decode import decode

SYNTAX = "hf:PATH[:CONFIG] or hf:[ORG/]NAME[@REVISION][:CONFIG], optionally followed by #image=COLUMN,label=COLUMN"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_COLUMN_OPTIONS = ("image", "label")


def _datasets():
    # Imported on first use: `datasets` takes about a second to import and brings pandas; only hf: needs it.
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(f"hf: datasets need the `datasets` library ({e}); install it with "
                           "`pip install 'featdp[hf]'`") from None
    return datasets


@dataclasses.dataclass(frozen=True)
class HfSpec:
    """A parsed `hf:` spec: a local directory (`path`) or a Hub repository (`name`), never both."""

    path: pathlib.Path | None
    name: str | None
    revision: str | None
    config: str | None
    columns: dict  # "image"/"label" -> column name chosen with #...


def _parse_columns(spec: str, options: str) -> dict:
    columns = {}
    for option in options.split(","):
        key, eq, value = (part.strip() for part in option.partition("="))
        if key not in _COLUMN_OPTIONS or not eq or not value or key in columns:
            raise DatasetError(f"{spec}: cannot parse the column choice {option.strip()!r} after '#'; expected "
                               "image=COLUMN and/or label=COLUMN, comma-separated")
        columns[key] = value
    return columns


def _looks_like_path(text: str) -> bool:
    """Hub names are NAME or ORG/NAME; anything else with a path's shape is meant as a directory."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or "\\" in text or os.path.exists(text)


def parse_hf_spec(spec: str, argument: str) -> HfSpec:
    """Parses the part of `spec` after `hf:`. An existing directory is a local dataset even when its name
    holds '@' or ':'; anything else must read as [ORG/]NAME[@REVISION][:CONFIG]."""
    body, hash_sign, options = argument.partition("#")
    columns = _parse_columns(spec, options) if hash_sign else {}
    body = body.strip()
    if not body:
        raise DatasetError(f"{spec}: give a dataset, as {SYNTAX}")
    head, colon, config = body.rpartition(":")
    if not colon:
        head, config = body, None
    elif not config:
        raise DatasetError(f"{spec}: empty configuration after ':'; expected {SYNTAX}")
    for where, config_name in ((body, None), (head, config)):
        if where and pathlib.Path(where).expanduser().is_dir():
            return HfSpec(pathlib.Path(where).expanduser().resolve(), None, None, config_name, columns)
    name, at, revision = head.partition("@")
    if at and pathlib.Path(name).expanduser().is_dir():
        raise DatasetError(f"{spec}: @{revision} names a Hub revision, but {name} is a local directory")
    if _looks_like_path(name):
        raise DatasetError(f"{spec}: {pathlib.Path(name).expanduser()} is not a directory (a dataset saved with "
                           "save_to_disk, or a folder of data files)")
    if not _HUB_NAME.match(name) or (at and not revision):
        raise DatasetError(f"{spec}: cannot parse {argument!r}; expected {SYNTAX}")
    return HfSpec(None, name, revision or None, config or None, columns)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load(spec: str, source: HfSpec, data_dir: str | None) -> tuple[dict, dict]:
    """({split: datasets.Dataset}, provenance), through `datasets`' own loaders."""
    datasets = _datasets()
    saved = source.path is not None and any(
        (source.path / name).is_file() for name in ("dataset_dict.json", "state.json"))
    try:
        if saved:
            if source.config is not None:
                raise DatasetError(f"{spec}: {source.path} was written by save_to_disk, which keeps no "
                                   f"configurations; drop :{source.config}")
            loaded = datasets.load_from_disk(str(source.path), keep_in_memory=False)
            if isinstance(loaded, datasets.Dataset):
                loaded = {str(loaded.split or "train"): loaded}
            provenance = {"kind": "save_to_disk", "path": str(source.path)}
        else:
            where = str(source.path) if source.path is not None else source.name
            builder = datasets.load_dataset_builder(where, source.config, revision=source.revision,
                                                    cache_dir=data_dir)
            # Without the Hub (offline, or unreachable) `datasets` falls back to its `Cache` builder, which
            # reads the newest prepared copy whatever the revision: only a full commit can be checked there.
            from_cache = type(builder).__name__ == "Cache"
            if source.revision and (from_cache or _COMMIT.match(source.revision)) and builder.hash != source.revision:
                raise DatasetError(
                    f"{spec}: the datasets cache holds commit {builder.hash} of {source.name}, not {source.revision}"
                    + (" (without the Hub a revision must be the cached copy's full commit)" if from_cache else ""))
            builder.download_and_prepare()
            loaded = builder.as_dataset(in_memory=False)
            provenance = {
                "kind": "local" if source.path is not None else "hub",
                **({"path": str(source.path)} if source.path is not None else {"repo_id": source.name}),
                "revision": source.revision,
                # For a Hub dataset, the commit it was prepared from; for a local one, a hash of its files.
                "hash": builder.hash,
                "config": builder.config.name,
                "cache_dir": str(builder.cache_dir),
            }
    except DatasetError:
        raise
    except Exception as e:  # `datasets` raises many types (ConnectionError, FileNotFoundError, its own, ...)
        offline = "" if saved or not getattr(datasets.config, "HF_HUB_OFFLINE", False) else (
            f" (offline: only datasets prepared in {data_dir or datasets.config.HF_DATASETS_CACHE} are read)")
        what = "it" if source.path is not None else f"the Hub dataset {source.name} (nor is it a local directory)"
        raise DatasetError(f"{spec}: `datasets` cannot open {what}: {_first_line(e)}{offline}") from e
    if not loaded:
        raise DatasetError(f"{spec}: the dataset has no splits")
    provenance["datasets_version"] = datasets.__version__
    return {str(name): split for name, split in loaded.items()}, provenance


def _pick_column(spec: str, features, kind, option: str, chosen: str | None) -> str:
    """The column of feature class `kind`: `chosen` if given, else the only one, else the one named `option`."""
    described = ", ".join(f"{name} ({type(feature).__name__})" for name, feature in features.items())
    if chosen is not None:
        if chosen not in features:
            raise DatasetError(f"{spec}: no column {chosen!r}; columns: {described}")
        if not isinstance(features[chosen], kind):
            raise DatasetError(f"{spec}: column {chosen!r} is {type(features[chosen]).__name__}, not "
                               f"{kind.__name__}; columns: {described}")
        return chosen
    candidates = [name for name, feature in features.items() if isinstance(feature, kind)]
    if len(candidates) == 1:
        return candidates[0]
    if option in candidates:
        return option
    if not candidates:
        hint = (" featdp needs class names: cast an integer label column with "
                "dataset.cast_column(COLUMN, datasets.ClassLabel(names=[...]))" if option == "label" else "")
        raise DatasetError(f"{spec}: no {kind.__name__} column; columns: {described}.{hint}")
    raise DatasetError(f"{spec}: {len(candidates)} {kind.__name__} columns ({', '.join(candidates)}); choose one "
                       f"by appending #{option}=COLUMN to the spec")


class HfDataset(SourceBase):
    """Random access to a `datasets` dataset's (image, label) columns, read from its Arrow files."""

    _TRANSIENT = ("_columns",)

    def __init__(self, spec: str, source: HfSpec, splits: dict, provenance: dict):
        datasets = _datasets()
        first = next(iter(splits.values()))
        self.image_column = _pick_column(spec, first.features, datasets.Image, "image", source.columns.get("image"))
        self.label_column = _pick_column(spec, first.features, datasets.ClassLabel, "label",
                                         source.columns.get("label"))
        image_feature, label_feature = first.features[self.image_column], first.features[self.label_column]
        self.image_mode = image_feature.mode
        self._files: dict[str, list[str]] = {}
        fingerprint_splits = {}
        for name, split in splits.items():
            if (split.features.get(self.image_column) != image_feature
                    or split.features.get(self.label_column) != label_feature):
                raise DatasetError(f"{spec}: split {name!r} has other {self.image_column!r}/{self.label_column!r} "
                                   f"features than split {next(iter(splits))!r}")
            files = [f["filename"] for f in split.cache_files]
            # The rows are read from these files in this order; an index mapping (select/shuffle without
            # flatten_indices) would reorder them, and an in-memory table has no files at all.
            if not files or getattr(split, "_indices", None) is not None:
                raise DatasetError(f"{spec}: split {name!r} is not backed by Arrow files in row order; save it "
                                   "with save_to_disk and open that directory")
            self._files[name] = files
            fingerprint_splits[name] = {
                "num_examples": split.num_rows,
                "datasets_fingerprint": split._fingerprint,
                "files": [[os.path.basename(f), os.path.getsize(f)] for f in files],
            }
        self._provenance = provenance
        self._fingerprint = {
            "source": "hf",
            **{key: provenance.get(key) for key in ("repo_id", "revision", "hash", "config") if key in provenance},
            "image_column": self.image_column,
            "label_column": self.label_column,
            "class_names": list(label_feature.names),
            "splits": fingerprint_splits,
        }
        super().__init__(spec, label_feature.names, [SplitInfo(name, s.num_rows) for name, s in splits.items()])

    def _reset_transient(self) -> None:
        self._columns: dict[str, tuple] = {}

    def _split_columns(self, split: str) -> tuple:
        columns = self._columns.get(split)
        if columns is None:
            with self._lock:
                columns = self._columns.get(split)
                if columns is None:
                    columns = self._columns[split] = self._read_columns(split)
        return columns

    def _read_columns(self, split: str) -> tuple:
        """The split's image and label columns, memory-mapped from its Arrow files (`datasets` writes them
        in Arrow's streaming format)."""
        import pyarrow as pa

        images, labels, rows = [], [], 0
        for path in self._files[split]:
            try:
                table = pa.ipc.open_stream(pa.memory_map(path)).read_all()
            except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
                raise DatasetError(f"{self.spec}: cannot read {path} (split {split!r}): {e}") from e
            missing = [c for c in (self.image_column, self.label_column) if c not in table.column_names]
            if missing:
                raise DatasetError(f"{self.spec}: {path} has no column {missing[0]!r}; the dataset changed on disk")
            images.append(table.column(self.image_column))
            labels.append(table.column(self.label_column))
            rows += table.num_rows
        if rows != self.splits[split]:
            raise DatasetError(f"{self.spec}: split {split!r} has {rows} rows in its Arrow files, not the "
                               f"{self.splits[split]} it had when opened; the dataset changed on disk")
        return (pa.chunked_array([c for column in images for c in column.chunks], images[0].type),
                pa.chunked_array([c for column in labels for c in column.chunks], labels[0].type))

    def example(self, split: str, i: int) -> tuple[np.ndarray, int]:
        index = self._check(split, i)
        images, labels = self._split_columns(split)
        where = f"example {index} of split {split!r} of {self.spec}"
        label = labels[index].as_py()
        if label is None or not 0 <= label < len(self.class_names):
            raise DatasetError(f"{where} has no label ({self.label_column}={label}, classes 0.."
                               f"{len(self.class_names) - 1}); unlabelled splits cannot be extracted: choose "
                               "labelled ones with --splits")
        value = images[index].as_py() or {}
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            image = decode(io.BytesIO(data), where, upright=True, mode=self.image_mode)
        elif path and "://" not in path and "::" not in path:
            image = decode(path, f"{path} ({where})", upright=True, mode=self.image_mode)
        else:
            raise DatasetError(f"{where} has no image stored in the dataset or in a local file "
                               f"(path: {path!r}); featdp reads no remote images")
        return image, int(label)

    def fingerprint(self) -> dict:
        """The Hub repository, revision, commit (or local files' hash) and configuration when `load_dataset`
        read it; the image and label columns and class names; per split, the number of examples,
        `datasets`' own fingerprint (for a saved dataset the one in its state.json, which follows its
        content and the transforms that made it) and the Arrow files' names and sizes."""
        return json.loads(json.dumps(self._fingerprint))  # a copy

    def description(self) -> dict:
        return {
            "source": "hf",
            "spec": self.spec,
            **self._provenance,
            "splits": dict(self.splits),
            "num_classes": len(self.class_names),
            "image_column": self.image_column,
            "label_column": self.label_column,
        }


def open_hf(spec: str, argument: str, data_dir: str | None) -> HfDataset:
    """`hf:PATH_OR_NAME[@REVISION][:CONFIG][#image=COLUMN,label=COLUMN]`; see the module docstring."""
    source = parse_hf_spec(spec, argument)
    splits, provenance = _load(spec, source, data_dir)
    return HfDataset(spec, source, splits, provenance)
