"""featdp.extraction.datasets: spec parsing, the three sources, and the random-access contract a resumable loader
relies on (example i is the same whatever the order, thread or process it is read from)."""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from featdp.extraction.datasets import DatasetError, open_dataset
from featdp.extraction.datasets import fashion_mnist, idx

tfds = pytest.importorskip("tensorflow_datasets")


def check_contract(dataset, split, n_check=None):
    """Shapes, dtypes, label range, JSON-able provenance, and the same examples in any order and thread."""
    n = dataset.splits[split] if n_check is None else min(n_check, dataset.splits[split])
    first = [dataset.example(split, i) for i in range(n)]
    for image, label in first:
        assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 1
        assert image.ndim == 2 or image.shape[-1] in (3, 4)
        assert isinstance(label, int) and 0 <= label < len(dataset.class_names)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda i: dataset.example(split, i), reversed(range(n))))[::-1]
    for (a, la), (b, lb) in zip(first, again):
        assert la == lb and np.array_equal(a, b)
    json.dumps(dataset.description())
    assert dataset.description()["spec"] == dataset.spec
    return first


# ---------------------------------------------------------------- spec strings


@pytest.mark.parametrize(
    "spec, hint",
    [("cifar10", "tfds:cifar10"), ("/data/pets", "folder:/data/pets"), ("hub:foo", "unknown source 'hub'")],
)
def test_unknown_spec_says_what_to_write(spec, hint):
    with pytest.raises(DatasetError, match="unknown dataset spec") as e:
        open_dataset(spec)
    assert hint in str(e.value) and "fashion_mnist" in str(e.value)


# ---------------------------------------------------------------- IDX and Fashion-MNIST


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_idx_round_trip(tmp_path, compress, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    data = idx.idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compress else data)
    assert idx.read_header(path) == (np.dtype(array.dtype).newbyteorder(">"), (2, 3, 5))
    out = idx.read_idx(path)
    assert out.dtype == array.dtype and np.array_equal(out, array)


IDX_DATA = idx.idx_bytes(np.zeros((4, 28, 28), np.uint8))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("cut.idx", IDX_DATA[:-100], "truncated"),
        ("cut-inside.idx.gz", gzip.compress(IDX_DATA[:-100]), "truncated"),
        ("cut-stream.idx.gz", gzip.compress(IDX_DATA)[:-30], "truncated or corrupt"),
        ("padded.idx", IDX_DATA + b"\0", "trailing bytes"),
    ],
)
def test_idx_truncated_or_padded_file_is_an_error_naming_it(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=f"{name}.*{message}"):
        idx.read_idx(path)


def test_idx_bad_magic(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(b"\x00\x00\x07\x01" + bytes(8))
    with pytest.raises(DatasetError, match="not an IDX file"):
        idx.read_idx(path)


def write_fashion_mnist(directory: pathlib.Path, n_train=7, n_test=3, gz=(True, False)):
    """Synthetic IDX files: image k of a split is filled with k, its label is k mod 10."""
    directory.mkdir(parents=True, exist_ok=True)
    for (prefix, n), compress in zip([("train", n_train), ("t10k", n_test)], gz):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
        labels = (np.arange(n) % 10).astype(np.uint8)
        for stem, array in [(f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)]:
            data = idx.idx_bytes(array)
            path = directory / (stem + ".gz" if compress else stem)
            path.write_bytes(gzip.compress(data) if compress else data)
    return directory


@pytest.mark.parametrize("spec", ["fashion_mnist", "fashion-mnist"])
def test_fashion_mnist_from_gz_and_raw_files(tmp_path, spec):
    dataset = open_dataset(spec, data_dir=write_fashion_mnist(tmp_path / "fm"))
    assert dataset.splits == {"train": 7, "test": 3}
    assert dataset.class_names[0] == "T-shirt/top" and dataset.class_names[9] == "Ankle boot"
    for split in dataset.splits:
        examples = check_contract(dataset, split)
        for k, (image, label) in enumerate(examples):
            assert image.shape == (28, 28) and np.all(image == k) and label == k % 10
    clone = pickle.loads(pickle.dumps(dataset))  # process-based loader workers
    assert np.array_equal(clone.example("train", 5)[0], dataset.example("train", 5)[0])


def test_fashion_mnist_directory_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(write_fashion_mnist(tmp_path / "env")))
    assert open_dataset("fashion_mnist").splits == {"train": 7, "test": 3}


def test_fashion_mnist_missing_directory_or_file_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as e:
        open_dataset("fashion_mnist", data_dir=tmp_path / "nowhere")
    assert "--data-dir" in str(e.value) and "nowhere" in str(e.value)
    directory = write_fashion_mnist(tmp_path / "fm")
    (directory / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
        open_dataset("fashion_mnist", data_dir=directory)


def test_fashion_mnist_truncated_file_is_an_error_naming_it(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", gz=(False, False))
    path = directory / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    dataset = open_dataset("fashion_mnist", data_dir=directory)  # only headers are read on open
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.*truncated"):
        dataset.example("train", 0)
    assert dataset.example("test", 2)[1] == 2  # the other split is unaffected


def test_fashion_mnist_images_and_labels_must_agree(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", gz=(False, False))
    (directory / "t10k-labels-idx1-ubyte").write_bytes(idx.idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        open_dataset("fashion_mnist", data_dir=directory)


def _real_fashion_mnist_dir():
    directory, _ = fashion_mnist.resolve_dir(None)
    return directory if (directory / "t10k-labels-idx1-ubyte.gz").exists() or (
        directory / "t10k-labels-idx1-ubyte").exists() else None


@pytest.mark.skipif(_real_fashion_mnist_dir() is None, reason="Fashion-MNIST files not installed")
def test_real_fashion_mnist():
    dataset = open_dataset("fashion_mnist")
    assert dataset.splits == {"train": 60000, "test": 10000}
    image, label = dataset.example("train", 0)
    assert image.shape == (28, 28) and label == 9  # the first training image is an ankle boot
    image, label = dataset.example("test", 9999)
    assert image.shape == (28, 28) and 0 <= label < 10


# ---------------------------------------------------------------- folders of images


def _save(path: pathlib.Path, image: Image.Image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


@pytest.fixture
def image_tree(tmp_path):
    """train: cat (3 images, one in a subfolder), dog (2); test: cat (1), emu (1); plus non-images."""
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    root = tmp_path / "pets"
    _save(root / "train/cat/b.png", rgb(5, 7))
    _save(root / "train/cat/a.JPG", rgb(8, 6))  # upper-case extension counts
    _save(root / "train/cat/sub/c.png", Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA"))
    palette = Image.fromarray(rng.integers(0, 4, (6, 5), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    _save(root / "train/dog/p.png", palette, transparency=0)
    _save(root / "train/dog/q.jpg", Image.new("CMYK", (3, 2), (0, 255, 255, 0)))
    _save(root / "test/cat/g.png", Image.fromarray(np.full((9, 4), 77, np.uint8), "L"))
    _save(root / "test/emu/w.tiff", Image.fromarray(np.full((2, 3), 0x1234, np.uint16)))  # 16-bit gray
    (root / "train/cat/notes.txt").write_text("not an image")
    (root / "train/cat/._a.jpg").write_bytes(b"macOS resource fork")
    (root / "train/cat/.DS_Store").write_bytes(b"\0")
    (root / ".cache").mkdir()
    return root


def test_folder_splits_classes_order_and_decoding(image_tree):
    dataset = open_dataset(f"folder:{image_tree}")
    assert dataset.class_names == ("cat", "dog", "emu")  # union over splits: labels agree between them
    assert dataset.splits == {"test": 2, "train": 5}
    files = [dataset.path("train", i).relative_to(image_tree).as_posix() for i in range(5)]
    assert files == ["train/cat/a.JPG", "train/cat/b.png", "train/cat/sub/c.png", "train/dog/p.png",
                     "train/dog/q.jpg"]
    train = check_contract(dataset, "train")
    assert [label for _, label in train] == [0, 0, 0, 1, 1]
    assert [image.shape for image, _ in train] == [(8, 6, 3), (5, 7, 3), (4, 4, 3), (6, 5, 3), (2, 3, 3)]
    assert np.array_equal(train[1][0], np.asarray(Image.open(image_tree / "train/cat/b.png")))
    rgba = np.asarray(Image.open(image_tree / "train/cat/sub/c.png"))
    assert np.array_equal(train[2][0], rgba[..., :3])  # alpha dropped, colours untouched
    assert set(map(tuple, train[3][0].reshape(-1, 3))) <= {(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255)}
    assert np.all(train[4][0][..., 0] > 200) and np.all(train[4][0][..., 1:] < 50)  # CMYK (0,255,255,0) is red
    test = check_contract(dataset, "test")
    assert test[0][0].shape == (9, 4) and np.all(test[0][0] == 77) and test[0][1] == 0  # gray stays (H, W)
    assert np.all(test[1][0] == 0x12) and test[1][1] == 2  # 16-bit gray keeps its high byte
    assert pickle.loads(pickle.dumps(dataset)).example("test", 1)[1] == 2
    description = dataset.description()
    assert description["path"] == str(image_tree) and set(description["file_list_sha256"]) == {"train", "test"}


def test_folder_relative_path_under_data_dir(image_tree):
    dataset = open_dataset("folder:pets", data_dir=str(image_tree.parent))
    assert dataset.splits == {"test": 2, "train": 5}


def test_folder_corrupt_image_is_an_error_naming_the_file(image_tree):
    rng = np.random.default_rng(1)
    path = image_tree / "train/dog/r.jpg"
    _save(path, Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    dataset = open_dataset(f"folder:{image_tree}")  # listing does not decode
    with pytest.raises(DatasetError, match=r"train/dog/r\.jpg"):
        dataset.example("train", 5)
    assert dataset.example("train", 4)[1] == 1  # the files around it still read


@pytest.mark.parametrize(
    "layout, message",
    [
        ({}, "has no split folders"),
        ({"train/cat/a.png": True, "test/readme.txt": False}, r"test has no class folders"),
        ({"train/a.png": True}, "is PATH a split folder"),
        ({"train/cat/a.png": True, "test/cat/a.txt": False}, r"test holds no images"),
    ],
)
def test_folder_layout_errors(tmp_path, layout, message):
    root = tmp_path / "d"
    root.mkdir()
    for rel, is_image in layout.items():
        if is_image:
            _save(root / rel, Image.new("RGB", (2, 2)))
        else:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text("x")
    with pytest.raises(DatasetError, match=message):
        open_dataset(f"folder:{root}")


def test_folder_bad_split_index_and_path(image_tree):
    dataset = open_dataset(f"folder:{image_tree}")
    with pytest.raises(DatasetError, match="no split 'validation'; splits: test, train"):
        dataset.example("validation", 0)
    for bad in (-1, 5):
        with pytest.raises(DatasetError, match=r"outside split 'train' \(0 ≤ i < 5\)"):
            dataset.example("train", bad)
    with pytest.raises(DatasetError, match="is not a directory"):
        open_dataset(f"folder:{image_tree / 'missing'}")


# ---------------------------------------------------------------- TFDS
#
# tfds.testing.mock_data replaces the ArrayRecord files with random examples drawn from each real
# builder's feature spec. Split names and sizes come from the dataset_info.json a prepared dataset has;
# `write_tfds_metadata` writes one (without data files) so the real metadata path is exercised.

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_tfds_metadata(name, data_dir, num_examples, splits, file_format="array_record", class_names=None):
    builder = tfds.builder(name, data_dir=data_dir)
    if class_names:  # as generation would set them (cifar10's code only says num_classes=10)
        builder.info.features["label"].names = class_names
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, dataset_name=builder.name, filetype_suffix=file_format
    )
    split_infos = [
        tfds.core.SplitInfo(
            name=s, shard_lengths=[num_examples], num_bytes=0, filename_template=template.replace(split=s)
        )
        for s in splits
    ]
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.set_file_format(file_format, override=True)
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize(
    "name, splits, num_classes, first_class, image_shape",
    [
        ("cifar10", ("train", "test"), 10, "airplane", (32, 32, 3)),
        ("imagenet2012", ("train", "validation"), 1000, "n01440764", (None, None, 3)),
        ("imagenette", ("train", "validation"), 10, "n01440764", (None, None, 3)),
        ("imagenet_v2", ("test",), 1000, "n01440764", (None, None, 3)),
    ],
)
def test_tfds_mocked_builders(tmp_path, name, splits, num_classes, first_class, image_shape):
    n = 6
    write_tfds_metadata(name, tmp_path, n, splits, class_names=CIFAR10_NAMES if name == "cifar10" else None)
    with tfds.testing.mock_data(num_examples=n, data_dir=str(tmp_path)):
        dataset = open_dataset(f"tfds:{name}", data_dir=str(tmp_path))
        assert dataset.splits == {s: n for s in splits}
        assert len(dataset.class_names) == num_classes and dataset.class_names[0] == first_class
        for split in splits:
            for image, _ in check_contract(dataset, split):
                assert image.ndim == 3 and all(e in (None, a) for e, a in zip(image_shape, image.shape))
        description = dataset.description()
        assert description["source"] == "tfds" and description["name"] == name
        assert description["image_feature"] == "image" and description["label_feature"] == "label"
        with pytest.raises(DatasetError, match="no split 'bogus'"):
            dataset.example("bogus", 0)


def test_tfds_pinned_version(tmp_path):
    write_tfds_metadata("cifar10", tmp_path, 3, ("test",))
    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path)):
        dataset = open_dataset("tfds:cifar10:3.0.2", data_dir=str(tmp_path))
        assert dataset.description()["version"] == "3.0.2" and dataset.example("test", 2)[0].shape == (32, 32, 3)
    with pytest.raises(DatasetError, match="9.9.9"):
        open_dataset("tfds:cifar10:9.9.9", data_dir=str(tmp_path))


def test_tfds_unknown_dataset(tmp_path):
    with pytest.raises(DatasetError, match="unknown TFDS dataset 'no_such_dataset'"):
        open_dataset("tfds:no_such_dataset", data_dir=str(tmp_path))


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(DatasetError, match="not prepared") as e:
        open_dataset("tfds:cifar10", data_dir=str(tmp_path))
    assert f"tfds build cifar10 --file_format=array_record --data_dir {tmp_path}" in str(e.value)
    assert "--data-dir" in str(e.value)


def test_tfds_prepared_as_tfrecord_says_to_rebuild(tmp_path):
    write_tfds_metadata("cifar10", tmp_path, 3, ("train",), file_format="tfrecord")
    with pytest.raises(DatasetError, match="tfrecord files, which have no random access") as e:
        open_dataset("tfds:cifar10", data_dir=str(tmp_path))
    assert "--file_format=array_record" in str(e.value)


def test_tfds_missing_data_files_is_an_error_naming_them(tmp_path):
    write_tfds_metadata("cifar10", tmp_path, 3, ("train",))  # metadata only, no .array_record files
    dataset = open_dataset("tfds:cifar10", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="cifar10-train.array_record"):
        dataset.example("train", 0)


class FeatdpTinyGray(tfds.core.GeneratorBasedBuilder):
    """A real dataset, prepared as ArrayRecord without TensorFlow: image k is filled with k, label k % 3."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "picture": tfds.features.Image(shape=(None, None, 1)),
                "kind": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "k": np.int64,
            }),
            supervised_keys=("picture", "kind"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(7), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        import io

        for k in range(n):
            buffer = io.BytesIO()  # encoded bytes: encoding a numpy image would need TensorFlow
            Image.fromarray(np.full((3 + k, 4), k, np.uint8)).save(buffer, format="PNG")
            yield k, {"picture": buffer.getvalue(), "kind": k % 3, "k": k}


def test_tfds_real_array_record_dataset(tmp_path):
    FeatdpTinyGray(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    dataset = open_dataset("tfds:featdp_tiny_gray", data_dir=str(tmp_path))
    assert dataset.splits == {"train": 7, "test": 2} and dataset.class_names == ("a", "b", "c")
    examples = check_contract(dataset, "train")
    source = dataset._source("train")  # the stored order is TFDS's shuffle; "k" says which image it is
    ks = [int(source[i]["k"]) for i in range(7)]
    assert sorted(ks) == list(range(7))
    for k, (image, label) in zip(ks, examples):
        assert image.shape == (3 + k, 4) and np.all(image == k) and label == k % 3  # (H, W, 1) -> (H, W)
    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(clone.example("train", 3)[0], examples[3][0])
    assert dataset.description()["file_formats"] == ["array_record"]


# ---------------------------------------------------------------- fingerprints (resuming onto a changed source)


def _changed_keys(before: dict, after: dict, prefix="") -> set[str]:
    keys = set()
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys |= _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.add(prefix + key)
    return keys


def test_folder_fingerprint_follows_the_files(image_tree):
    def fingerprint():
        return open_dataset(f"folder:{image_tree}").fingerprint()

    first = fingerprint()
    json.dumps(first)
    assert first == fingerprint() == pickle.loads(pickle.dumps(open_dataset(f"folder:{image_tree}"))).fingerprint()
    assert first["splits"]["train"]["files"] == 5 and first["splits"]["test"]["files"] == 2

    path = image_tree / "train/dog/p.png"
    stat = path.stat()
    _save(path, Image.new("RGB", (9, 9), (1, 2, 3)))  # replaced: new content, new size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    replaced = fingerprint()
    assert _changed_keys(first, replaced) == {"splits.train.bytes", "splits.train.sizes_and_mtimes_sha256"}

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))  # rewritten (same size), or touched
    assert _changed_keys(replaced, fingerprint()) == {"splits.train.sizes_and_mtimes_sha256"}

    path.rename(image_tree / "train/dog/a.png")  # renamed: example order changes
    assert "splits.train.file_list_sha256" in _changed_keys(replaced, fingerprint())

    _save(image_tree / "test/emu/x.png", Image.new("L", (2, 2)))  # added
    assert {"splits.test.files", "splits.test.file_list_sha256"} <= _changed_keys(first, fingerprint())


def test_fashion_mnist_fingerprint_is_the_files_sha256(tmp_path):
    directory = write_fashion_mnist(tmp_path / "fm", gz=(False, False))
    first = open_dataset("fashion_mnist", data_dir=directory).fingerprint()
    path = directory / "t10k-images-idx3-ubyte"
    assert first["splits"]["test"][path.name] == hashlib.sha256(path.read_bytes()).hexdigest()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one pixel of the last test image
    path.write_bytes(bytes(data))
    os.utime(path, ns=(0, 10**9))
    after = open_dataset("fashion_mnist", data_dir=directory).fingerprint()
    assert _changed_keys(first, after) == {f"splits.test.{path.name}"}


def test_tfds_fingerprint_records_version_and_split_sizes(tmp_path):
    write_tfds_metadata("cifar10", tmp_path / "a", 3, ("train", "test"))
    write_tfds_metadata("cifar10", tmp_path / "b", 4, ("train", "test"))
    with tfds.testing.mock_data(num_examples=3, data_dir=str(tmp_path / "a")):
        a = open_dataset("tfds:cifar10", data_dir=str(tmp_path / "a")).fingerprint()
    b = open_dataset("tfds:cifar10", data_dir=str(tmp_path / "b")).fingerprint()
    json.dumps(a)
    assert a["name"] == "cifar10" and a["version"] == "3.0.2" and a["splits"]["test"]["num_examples"] == 3
    assert a == open_dataset("tfds:cifar10", data_dir=str(tmp_path / "a")).fingerprint()
    sizes = ("num_examples", "shard_lengths")
    assert _changed_keys(a, b) == {f"splits.{s}.{k}" for s in ("train", "test") for k in sizes}
