"""Image datasets by spec string, with random access to (uint8 image, label) by split and index.

    dataset = open_dataset("tfds:cifar10", data_dir="/data/tfds")
    image, label = dataset.example("train", 123)  # same result in any worker, in any order

Sources: `tfds:NAME[:VERSION]` (prepared TFDS datasets, read without TensorFlow), `folder:PATH`
(PATH/<split>/<class>/<images>), `hf:PATH_OR_NAME[@REVISION][:CONFIG]` (Hugging Face `datasets`: a saved
directory, a local folder or a Hub dataset), `fashion_mnist` (Debian's IDX files).
"""

from featdp.extraction.datasets.base import DatasetError, ImageDataset, SplitInfo
from featdp.extraction.datasets.registry import open_dataset, spec_forms

__all__ = ["DatasetError", "ImageDataset", "SplitInfo", "open_dataset", "spec_forms"]
