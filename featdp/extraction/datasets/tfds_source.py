"""TFDS datasets, read with `tfds.data_source`: random access to ArrayRecord (or Parquet) files, no TensorFlow.

Nothing is downloaded or generated here: the dataset must already be prepared in a random-access format
in `data_dir` (TFDS's default when None). The image is the supervised input (or the one Image feature),
the label the supervised target (or the one ClassLabel feature); class names come from that ClassLabel.
TFDS decodes the image; a (H, W, 1) image is returned as (H, W).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from featdp.extraction.datasets.base import DatasetError, SourceBase, SplitInfo, squeeze_gray


def _tfds():
    # Imported on first use: TFDS takes about a second to import, and only this source needs it.
    import tensorflow_datasets as tfds

    return tfds


def _build_command(name: str, data_dir: str) -> str:
    # `tfds build` generates only the newest version, so the command names none.
    return f"`tfds build {name.split(':')[0]} --file_format=array_record --data_dir {data_dir}`"


def _pick(spec: str, features, supervised_key, kind, default_name: str) -> str:
    """The feature of class `kind`: the supervised key if it is one, else `default_name`, else the only one."""
    candidates = [k for k, f in features.items() if isinstance(f, kind)]
    if supervised_key in candidates:
        return supervised_key
    if default_name in candidates:
        return default_name
    if len(candidates) != 1:
        raise DatasetError(
            f"{spec}: need exactly one top-level {kind.__name__} feature, found {candidates or 'none'} "
            f"(features: {', '.join(features.keys())})"
        )
    return candidates[0]


class TfdsDataset(SourceBase):
    _TRANSIENT = ("_sources",)

    def __init__(self, spec: str, builder, data_dir: str | None):
        tfds = _tfds()
        info = builder.info
        self.data_dir = data_dir
        self.dataset_dir = str(builder.data_dir)
        config = builder.builder_config.name if builder.builder_config else None
        # Workers re-open the exact version found here, even if a newer one is prepared meanwhile.
        self.tfds_name = f"{builder.name}{'/' + config if config else ''}:{info.version}"
        self._provenance = {
            "name": builder.name,
            "config": config,
            "version": str(info.version),
            "full_name": info.full_name,
            "file_formats": sorted(f.value for f in info.available_file_formats()),
            "tfds_version": tfds.__version__,
        }
        # supervised_keys is (input, target[, weight]), each a feature name or a nested structure.
        keys = info.supervised_keys if isinstance(info.supervised_keys, tuple) else ()
        supervised = (*keys, None, None)[:2]
        self.image_key = _pick(spec, info.features, supervised[0], tfds.features.Image, "image")
        self.label_key = _pick(spec, info.features, supervised[1], tfds.features.ClassLabel, "label")
        image_dtype = np.dtype(info.features[self.image_key].np_dtype)
        if image_dtype != np.uint8:
            raise DatasetError(f"{spec}: image feature {self.image_key!r} is {image_dtype}, not uint8")
        splits = [SplitInfo(str(name), int(s.num_examples)) for name, s in info.splits.items()]
        self._fingerprint = {
            "source": "tfds",
            "name": builder.name,
            "config": config,
            "version": str(info.version),
            "splits": {
                str(name): {
                    "num_examples": int(s.num_examples),
                    "num_bytes": int(s.num_bytes or 0),
                    "shard_lengths": [int(n) for n in (s.shard_lengths or ())],
                }
                for name, s in info.splits.items()
            },
        }
        super().__init__(spec, info.features[self.label_key].names, splits)

    def _reset_transient(self) -> None:
        self._sources: dict[str, object] = {}

    def _source(self, split: str):
        source = self._sources.get(split)
        if source is None:
            with self._lock:
                source = self._sources.get(split)
                if source is None:
                    source = self._sources[split] = self._open(split)
        return source

    def _open(self, split: str):
        try:
            source = _tfds().data_source(self.tfds_name, split=split, data_dir=self.data_dir, download=False)
        except (OSError, RuntimeError, ValueError) as e:
            raise DatasetError(f"{self.spec}: cannot open split {split!r} in {self.dataset_dir}: {e}") from e
        if len(source) != self.splits[split]:
            raise DatasetError(
                f"{self.spec}: split {split!r} in {self.dataset_dir} has {len(source)} examples in its files "
                f"but {self.splits[split]} in dataset_info.json; the preparation is incomplete: rebuild it"
            )
        return source

    def example(self, split: str, i: int) -> tuple[np.ndarray, int]:
        index = self._check(split, i)
        source = self._source(split)
        try:
            record = source[index]
        except (OSError, RuntimeError, ValueError) as e:
            raise DatasetError(
                f"{self.spec}: cannot read example {index} of split {split!r} from {self.dataset_dir}: {e}"
            ) from e
        image = np.asarray(record[self.image_key])
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise DatasetError(
                f"{self.spec}: example {index} of split {split!r} decoded to {image.dtype} {image.shape}, "
                "not a uint8 (H, W[, C]) image"
            )
        return squeeze_gray(image), int(record[self.label_key])

    def fingerprint(self) -> dict:
        """The builder's name, config and version, and each split's size, bytes and shard lengths, as the
        prepared dataset's dataset_info.json records them."""
        return json.loads(json.dumps(self._fingerprint))  # a copy

    def description(self) -> dict:
        return {
            "source": "tfds",
            "spec": self.spec,
            **self._provenance,
            "data_dir": self.dataset_dir,
            "splits": dict(self.splits),
            "num_classes": len(self.class_names),
            "image_feature": self.image_key,
            "label_feature": self.label_key,
        }


def _data_root(builder) -> pathlib.Path:
    """The data_dir that holds `builder` (its version folder minus name/[config/]version)."""
    depth = len(builder.info.full_name.split("/"))
    return pathlib.Path(builder.data_dir).parents[depth - 1]


def open_tfds(spec: str, name: str, data_dir: str | None) -> TfdsDataset:
    """`tfds:NAME[/CONFIG][:VERSION]`."""
    if not name:
        raise DatasetError(f"{spec}: give a TFDS dataset name, as tfds:NAME[:VERSION] (e.g. tfds:cifar10)")
    tfds = _tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        # TFDS's own message lists every dataset it knows: hundreds of lines.
        unknown = name.split(":")[0]
        raise DatasetError(f"{spec}: unknown TFDS dataset {unknown!r} (see `tfds.list_builders()`)") from None
    except (AssertionError, ValueError) as e:  # a version or config the dataset does not have
        raise DatasetError(f"{spec}: {str(e).splitlines()[0]}") from e
    if not builder.is_prepared():
        root = _data_root(builder)
        raise DatasetError(
            f"{spec}: {builder.info.full_name} is not prepared in {root} (no {builder.data_dir}). Prepare it "
            f"on a machine with internet with {_build_command(name, str(root))} and copy that directory "
            "here, or point --data-dir at the directory that already holds it"
        )
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    formats = builder.info.available_file_formats()
    if not formats & random_access:
        found = ", ".join(sorted(f.value for f in formats)) or "an unknown format"
        raise DatasetError(
            f"{spec}: {builder.data_dir} holds {found} files, which have no random access; rebuild them "
            f"with {_build_command(name, str(_data_root(builder)))}"
        )
    if not builder.info.splits:
        raise DatasetError(f"{spec}: {builder.data_dir} lists no splits in its dataset_info.json")
    return TfdsDataset(spec, builder, data_dir)
