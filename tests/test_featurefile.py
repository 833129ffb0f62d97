"""Tests for the HDF5 feature file (featdp.featurefile)."""

import datetime
import hashlib
import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

import featdp
from featdp.featurefile import (
    FORMAT,
    FORMAT_VERSION,
    FeatureFile,
    FeatureFileError,
    FeatureWriter,
    FileMetadata,
    file_sha256,
    write_features,
)

D, K = 6, 4
META = dict(
    class_names=("cat", "dog", "eel", "fox"),
    backbone="vit_b16",
    checkpoint="gs://bucket/ckpt.npz",
    checkpoint_sha256="ab" * 32,
    dataset="toy",
    image_size=224,
    preprocessing={"resize": 256, "crop": 224, "mean": [0.5, 0.5, 0.5]},
)


def _data(n, seed=0, d=D):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, K, n)


@pytest.fixture
def toy_file(tmp_path):
    """A complete two-split float32 file; returns (path, {split: (x, y)})."""
    splits = {"train": _data(50, 0), "test": _data(20, 1)}
    path = write_features(tmp_path / "f.h5", splits, num_classes=K, **META)
    return path, splits


def _set_features(path, split, values):
    """Overwrites a split's features behind the writer's back (to plant bad data)."""
    with h5py.File(path, "r+") as h5:
        h5[f"{split}/features"][...] = values


# --- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_with_metadata(tmp_path, dtype):
    x, y = _data(37)
    path = write_features(tmp_path / "f.h5", {"train": (x, y)}, num_classes=K, dtype=dtype, **META)
    with FeatureFile(path) as f:
        meta = f.metadata
        assert f.split_names == ("train",)
        split = f.split("train")
        xr, yr = split.read()
        index = split.read_index()
    assert isinstance(meta, FileMetadata)
    assert (meta.feature_dim, meta.num_classes, meta.format_version) == (D, K, FORMAT_VERSION)
    assert meta.class_names == META["class_names"]
    assert meta.preprocessing == META["preprocessing"]
    for key in ("backbone", "checkpoint", "checkpoint_sha256", "dataset", "image_size"):
        assert getattr(meta, key) == META[key]
    assert meta.featdp_version == featdp.__version__
    created = datetime.datetime.fromisoformat(meta.created_utc)
    assert created.utcoffset() == datetime.timedelta(0)
    assert json.loads(json.dumps(meta.to_json_dict()))["class_names"] == list(META["class_names"])

    assert (split.name, split.num_examples, split.feature_dim, split.num_classes) == ("train", 37, D, K)
    assert split.dtype == np.dtype(dtype)
    assert split.nbytes_float32() == 37 * D * 4
    assert xr.dtype == np.float32 and yr.dtype == np.int64
    np.testing.assert_array_equal(xr, x.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(yr, y)
    np.testing.assert_array_equal(index, np.arange(37))


def test_root_and_split_attributes_follow_the_layout(toy_file):
    path, splits = toy_file
    with h5py.File(path, "r") as h5:
        assert h5.attrs["format"] == FORMAT and h5.attrs["format_version"] == 1
        assert json.loads(h5.attrs["class_names"]) == list(META["class_names"])
        assert json.loads(h5.attrs["preprocessing"]) == META["preprocessing"]
        g = h5["train"]
        assert g["features"].shape == (50, D) and g["features"].chunks[1] == D
        assert g["features"].compression is None
        assert g["labels"].dtype == np.int32 and g["index"].dtype == np.int64
        assert (g.attrs["num_examples"], g.attrs["rows_done"], bool(g.attrs["complete"])) == (50, 50, True)


@pytest.mark.parametrize("block_rows", [1, 7, 10, 25, 50, 64])
def test_blocks_stream_the_whole_split(toy_file, block_rows):
    path, splits = toy_file
    with FeatureFile(path) as f:
        split = f.split("train")
        blocks = list(split.blocks(block_rows))
        x_all, y_all = split.read()
    assert all(len(xb) <= block_rows and xb.dtype == np.float32 and yb.dtype == np.int64 for xb, yb in blocks)
    assert len(blocks) == -(-50 // block_rows)
    np.testing.assert_array_equal(np.concatenate([xb for xb, _ in blocks]), x_all)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in blocks]), y_all)
    np.testing.assert_array_equal(x_all, splits["train"][0])


def test_empty_split_is_readable(tmp_path):
    path = write_features(tmp_path / "f.h5", {"train": _data(5), "val": _data(0)}, num_classes=K)
    with FeatureFile(path) as f:
        split = f.split("val")
        assert split.num_examples == 0 and list(split.blocks(4)) == []
        x, y = split.read()
    assert x.shape == (0, D) and y.shape == (0,)


def test_file_sha256_hashes_the_bytes(toy_file):
    path, _ = toy_file
    assert file_sha256(path, chunk_bytes=1000) == hashlib.sha256(path.read_bytes()).hexdigest()



def test_file_sha256_follows_a_rewrite_of_the_same_size(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    first = file_sha256(path)
    assert file_sha256(path) == first  # remembered
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(1, 1))  # a new modification time, as any rewrite has
    assert file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest() != first

# --- writing and resuming -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_resume_after_close_equals_one_shot_write(tmp_path, dtype):
    x, y = _data(30)
    idx = np.arange(100, 130)
    path = tmp_path / "resumed.h5"
    with FeatureWriter(path, feature_dim=D, num_classes=K, **META) as w:
        assert w.create_split("train", 30, dtype=dtype, chunk_rows=8) == 0
        assert w.append("train", x[:7], y[:7], idx[:7]) == 7
        assert w.append("train", x[7:12], y[7:12], idx[7:12]) == 12
    with FeatureWriter(path, feature_dim=D, num_classes=K, **META) as w:
        assert w.create_split("train", 30, dtype=dtype, chunk_rows=8) == 12
        assert w.rows_done("train") == 12
        assert w.append("train", x[12:], y[12:], idx[12:]) == 30
        w.mark_complete("train")

    one_shot = write_features(tmp_path / "one.h5", {"train": (x, y)}, num_classes=K, dtype=dtype, **META)
    with FeatureFile(path) as resumed, FeatureFile(one_shot) as ref:
        xr, yr = resumed.split("train").read()
        xo, yo = ref.split("train").read()
        np.testing.assert_array_equal(resumed.split("train").read_index(), idx)
    np.testing.assert_array_equal(xr, xo)
    np.testing.assert_array_equal(yr, yo)


def test_resume_after_the_writer_is_killed(tmp_path):
    path = tmp_path / "killed.h5"
    script = f"""
import os, numpy as np
from featdp.featurefile import FeatureWriter
w = FeatureWriter({str(path)!r}, feature_dim={D}, num_classes={K})
w.create_split("train", 20)
x = np.arange(20 * {D}, dtype=np.float32).reshape(20, {D})
w.append("train", x[:9], np.arange(9) % {K}, np.arange(9))
os._exit(0)  # no close(): what a crash leaves behind
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    x = np.arange(20 * D, dtype=np.float32).reshape(20, D)
    with FeatureWriter(path, feature_dim=D, num_classes=K) as w:
        assert w.create_split("train", 20) == 9
        w.append("train", x[9:], np.arange(9, 20) % K, np.arange(9, 20))
        w.mark_complete("train")
    with FeatureFile(path) as f:
        np.testing.assert_array_equal(f.split("train").read()[0], x)


@pytest.mark.parametrize(
    "change",
    [
        {"backbone": "resnet50"},
        {"checkpoint_sha256": "cd" * 32},
        {"feature_dim": D + 1},
        {"num_classes": K + 1, "class_names": None},
        {"class_names": ("cat", "dog", "eel", "gnu")},
        {"preprocessing": {"resize": 256, "crop": 192, "mean": [0.5, 0.5, 0.5]}},
        {"image_size": 192},
    ],
)
def test_resume_with_different_metadata_is_refused_unless_overwrite(toy_file, change):
    path, _ = toy_file
    args = {"feature_dim": D, "num_classes": K, **META, **change}
    attribute = next(iter(change))
    with pytest.raises(FeatureFileError, match=f"attribute '{attribute}' differs") as info:
        FeatureWriter(path, **args)
    assert str(path) in str(info.value)
    with FeatureWriter(path, overwrite=True, **args) as w:
        assert w.metadata.backbone == args["backbone"]
    with FeatureFile(path) as f:
        assert f.split_names == ()
        assert f.metadata.feature_dim == args["feature_dim"]


def test_resume_ignores_created_utc_and_featdp_version(toy_file):
    path, _ = toy_file
    with h5py.File(path, "r+") as h5:
        h5.attrs["created_utc"] = "2000-01-01T00:00:00+00:00"
        h5.attrs["featdp_version"] = "0.0.1"
    with FeatureWriter(path, feature_dim=D, num_classes=K, **META) as w:
        assert w.create_split("train", 50, dtype="float32") == 50
        assert w.metadata.created_utc.startswith("2000")


def test_create_split_with_a_different_shape_is_refused(toy_file):
    path, _ = toy_file
    with FeatureWriter(path, feature_dim=D, num_classes=K, **META) as w:
        with pytest.raises(FeatureFileError, match=r"split 'train' exists with features \(50, 6\)"):
            w.create_split("train", 51, dtype="float32")
        with pytest.raises(FeatureFileError, match="float16"):
            w.create_split("train", 50, dtype="float16")


def test_default_class_names_are_the_label_numbers(tmp_path):
    with FeatureWriter(tmp_path / "f.h5", feature_dim=D, num_classes=3) as w:
        assert w.metadata.class_names == ("0", "1", "2")
    with pytest.raises(FeatureFileError, match="2 class_names given for num_classes=3"):
        FeatureWriter(tmp_path / "g.h5", feature_dim=D, num_classes=3, class_names=["a", "b"])


@pytest.fixture
def writer(tmp_path):
    with FeatureWriter(tmp_path / "w.h5", feature_dim=D, num_classes=K) as w:
        w.create_split("train", 10, dtype="float16")
        w.append("train", *_data(4), np.arange(4))
        yield w


def test_append_past_num_examples(writer):
    x, y = _data(7)
    with pytest.raises(FeatureFileError, match="appending 7 rows at row 4 would pass num_examples=10"):
        writer.append("train", x, y, np.arange(7))
    assert writer.rows_done("train") == 4


def test_append_wrong_feature_dim(writer):
    x, y = _data(3, d=D + 2)
    with pytest.raises(FeatureFileError, match=r"shape \(3, 8\), expected \(b, 6\)"):
        writer.append("train", x, y, np.arange(3))


def test_append_mismatched_label_and_index_lengths(writer):
    x, y = _data(3)
    with pytest.raises(FeatureFileError, match="must both have shape"):
        writer.append("train", x, y[:2], np.arange(3))
    with pytest.raises(FeatureFileError, match="must both have shape"):
        writer.append("train", x, y, np.arange(4))
    with pytest.raises(FeatureFileError, match="labels must be integers"):
        writer.append("train", x, y.astype(np.float32), np.arange(3))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e6])
def test_append_non_finite_names_the_row(writer, bad):
    x, y = _data(3)
    x[1, 2] = bad
    with pytest.raises(FeatureFileError, match=r"split 'train', row 5: feature vector") as info:
        writer.append("train", x, y, np.arange(3))
    # 1e6 is finite in float32 but not in a float16 file.
    assert ("overflows float16" in str(info.value)) == np.isfinite(bad)
    assert writer.rows_done("train") == 4


@pytest.mark.parametrize("label", [-1, K, 99])
def test_append_label_out_of_range(writer, label):
    x, y = _data(3)
    y[2] = label
    with pytest.raises(FeatureFileError, match=rf"row 6: label {label} outside \[0, {K}\)"):
        writer.append("train", x, y, np.arange(3))


def test_append_to_unknown_split_and_early_mark_complete(writer):
    with pytest.raises(FeatureFileError, match=r"no split 'val'; available splits: \['train'\]"):
        writer.append("val", *_data(1), np.arange(1))
    with pytest.raises(FeatureFileError, match="rows_done=4 of 10"):
        writer.mark_complete("train")


def test_write_features_failure_leaves_no_file(tmp_path):
    bad_x, bad_y = _data(8, 1)
    bad_x[5, 0] = np.nan
    target = tmp_path / "f.h5"
    with pytest.raises(FeatureFileError, match=r"split 'test', row 5") as info:
        write_features(target, {"train": _data(20), "test": (bad_x, bad_y)}, num_classes=K)
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_write_features_failure_keeps_the_existing_file(toy_file):
    path, _ = toy_file
    before = path.read_bytes()
    with pytest.raises(FeatureFileError, match=r"row 0: label 7"):
        write_features(path, {"train": (np.zeros((3, D)), np.array([7, 0, 0]))}, num_classes=K, overwrite=True)
    assert path.read_bytes() == before
    assert list(path.parent.iterdir()) == [path]


def test_write_features_refuses_to_replace_without_overwrite(toy_file):
    path, _ = toy_file
    with pytest.raises(FeatureFileError, match="file exists"):
        write_features(path, {"train": _data(3)}, num_classes=K)


# --- opening errors ------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.h5"
    with pytest.raises(FeatureFileError, match=f"{re.escape(str(path))}: no such file"):
        FeatureFile(path)


def test_truncated_file(toy_file):
    path, _ = toy_file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match=r"truncated or corrupt\?"):
        with FeatureFile(path) as f:
            f.split("train").read()


def test_random_bytes_file(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(FeatureFileError, match=r"not a readable HDF5 feature file \(truncated or corrupt\?\)"):
        FeatureFile(path)
    with pytest.raises(FeatureFileError, match="truncated or corrupt"):
        FeatureWriter(path, feature_dim=D, num_classes=K)


def test_wrong_format(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "someone-else"
        h5["x"] = np.zeros(3)
    with pytest.raises(FeatureFileError, match="format='someone-else', expected 'featdp-features'"):
        FeatureFile(path)
    with pytest.raises(FeatureFileError, match="not a featdp feature file"):
        FeatureWriter(path, feature_dim=D, num_classes=K)


def test_unknown_format_version(toy_file):
    path, _ = toy_file
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = 7
    with pytest.raises(FeatureFileError, match="unsupported format_version 7.*reads format_version 1"):
        FeatureFile(path)


def test_missing_split_lists_the_available_ones(toy_file):
    path, _ = toy_file
    with FeatureFile(path) as f:
        with pytest.raises(FeatureFileError, match=r"no split 'val'; available splits: \['test', 'train'\]"):
            f.split("val")


def test_incomplete_split(tmp_path):
    path = tmp_path / "partial.h5"
    x, y = _data(10)
    with FeatureWriter(path, feature_dim=D, num_classes=K) as w:
        w.create_split("train", 10, dtype="float32")
        w.append("train", x[:6], y[:6], np.arange(6))
    with FeatureFile(path) as f:
        with pytest.raises(FeatureFileError, match=r"incomplete \(rows_done=6 of num_examples=10\).*re-run"):
            f.split("train")
        partial = f.split("train", require_complete=False)
        assert partial.num_examples == 6
        np.testing.assert_array_equal(partial.read()[0], x[:6])


def test_feature_dim_mismatch_between_splits(toy_file):
    path, _ = toy_file
    with h5py.File(path, "r+") as h5:
        del h5["test/features"]
        h5["test/features"] = np.zeros((20, D + 3), np.float32)
    with FeatureFile(path) as f:
        f.split("train")
        with pytest.raises(FeatureFileError, match=r"split 'test'.*\(20, 9\).*feature_dim is 6"):
            f.split("test")


def test_label_and_index_length_mismatch(toy_file):
    path, _ = toy_file
    with h5py.File(path, "r+") as h5:
        del h5["test/labels"]
        h5["test/labels"] = np.zeros(19, np.int32)
    with FeatureFile(path) as f:
        with pytest.raises(FeatureFileError, match=r"labels \(19,\).*do not match features \(20, 6\)"):
            f.split("test")


# --- data errors while reading -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("block_rows", [4, 1000])
def test_non_finite_row_is_reported(toy_file, bad, block_rows):
    path, splits = toy_file
    x = splits["train"][0].copy()
    x[[13, 41], 3] = bad
    _set_features(path, "train", x)
    with FeatureFile(path) as f:
        split = f.split("train")
        with pytest.raises(FeatureFileError, match=r"split 'train', row 13: feature vector is not finite"):
            for _ in split.blocks(block_rows):
                pass
        with pytest.raises(FeatureFileError, match="row 13"):
            split.read()


def test_label_out_of_range_is_reported(toy_file):
    path, _ = toy_file
    with h5py.File(path, "r+") as h5:
        h5["test/labels"][17] = 9
    with FeatureFile(path) as f:
        split = f.split("test")
        with pytest.raises(FeatureFileError, match=rf"split 'test', row 17: label 9 outside \[0, {K}\)") as info:
            list(split.blocks(5))
    assert str(path) in str(info.value)
