"""Dataset spec strings -> sources. Adding a source is one module plus one line in a table here.

Spec forms: `SCHEME:ARGUMENT` (tfds:cifar10, folder:/data/pets, hf:uoft-cs/cifar10) or a bare dataset name
(fashion_mnist).
"""

from __future__ import annotations

from typing import Callable

from featdp.extraction.datasets.base import DatasetError, ImageDataset
from featdp.extraction.datasets.fashion_mnist import open_fashion_mnist
from featdp.extraction.datasets.folder_source import open_folder
from featdp.extraction.datasets.hf_source import open_hf
from featdp.extraction.datasets.tfds_source import open_tfds

# scheme -> opener(spec, argument, data_dir)
SCHEMES: dict[str, Callable[[str, str, str | None], ImageDataset]] = {
    "tfds": open_tfds,
    "folder": open_folder,
    "hf": open_hf,
}
# bare name -> opener(spec, data_dir)
NAMED: dict[str, Callable[[str, str | None], ImageDataset]] = {
    "fashion_mnist": open_fashion_mnist,
    "fashion-mnist": open_fashion_mnist,
}


def spec_forms() -> list[str]:
    """The accepted spec forms, for help texts and error messages."""
    return [f"{scheme}:..." for scheme in SCHEMES] + list(NAMED)


def open_dataset(spec: str, *, data_dir: str | None = None) -> ImageDataset:
    """Opens the dataset `spec` names; `data_dir` is where the source looks for its files:

    * `tfds:NAME[/CONFIG][:VERSION]`: TFDS's data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    * `folder:PATH`: a relative PATH is taken under data_dir.
    * `hf:PATH_OR_NAME[@REVISION][:CONFIG]`: Hugging Face `datasets`' cache_dir (default: $HF_DATASETS_CACHE).
    * `fashion_mnist`: the folder of its IDX files (default: $FEATDP_FASHION_MNIST_DIR, then Debian's).
    """
    spec = str(spec).strip()
    data_dir = None if data_dir is None else str(data_dir)
    scheme, sep, argument = spec.partition(":")
    if sep and scheme in SCHEMES:
        return SCHEMES[scheme](spec, argument.strip(), data_dir)
    if spec in NAMED:
        return NAMED[spec](spec, data_dir)
    if sep:
        hint = f"unknown source {scheme!r}"
    elif "/" in spec or "\\" in spec:
        hint = f"for a folder of images write folder:{spec}"
    else:
        hint = f"for a TFDS dataset write tfds:{spec}"
    raise DatasetError(f"unknown dataset spec {spec!r} ({hint}); accepted: {', '.join(spec_forms())}")
