"""Splits of several views per example in the feature file (featdp.featurefile, "Views"; featdp.featurefile_parts):
the example-major layout, the writer's and the reader's refusals, row ranges, sharded files and `featdp info`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featdp.featurefile import MAX_VIEWS, FeatureFile, FeatureFileError, FeatureWriter, write_features
from featdp.featurefile_parts import part_path, write_parts
from featdp_cli.main import app

D, K, V = 5, 3, 3


def _views(n, views=V, seed=0):
    """Features (n, views, D) and labels (n,): every view of every example distinct."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, views, D)).astype(np.float32), rng.integers(0, K, n)


@pytest.fixture
def view_file(tmp_path):
    """A file whose train split holds 3 views of 8 examples and whose test split holds one view of 4."""
    train, test = _views(8), _views(4, seed=1)
    path = write_features(tmp_path / "f.h5", {"train": train, "test": (test[0][:, 0], test[1])}, num_classes=K)
    return path, train, test


def _set(path, split, **values):
    """Overwrites attributes (and datasets) of a split behind the writer's back, to plant bad files."""
    with h5py.File(path, "r+") as h5:
        group = h5[split]
        for name, value in values.items():
            if name in ("labels", "index"):
                group[name][...] = value
            else:
                group.attrs[name] = value


# --- layout -----------------------------------------------------------------------------------------------------


def test_a_3d_split_is_written_example_major_with_labels_and_index_repeated(view_file):
    path, (x, y), _ = view_file
    with FeatureFile(path) as handle:
        split = handle.split("train")
        features, labels = split.read()
        index = split.read_index()
        assert split.views_per_example == V and split.num_examples == 8 * V
    np.testing.assert_array_equal(features, x.reshape(8 * V, D))  # row i·V + v is view v of example i
    np.testing.assert_array_equal(labels, np.repeat(y, V))
    np.testing.assert_array_equal(index, np.repeat(np.arange(8), V))
    with h5py.File(path, "r") as h5:
        assert int(h5["train"].attrs["views"]) == V and int(h5["train"].attrs["num_examples"]) == 8 * V


def test_a_2d_split_is_one_view_and_stored_as_before(view_file):
    path, _, (x, y) = view_file
    with FeatureFile(path) as handle:
        split = handle.split("test")
        features, labels = split.read()
        assert split.views_per_example == 1 and split.num_examples == 4
        assert "views" not in repr(split)
    np.testing.assert_array_equal(features, x[:, 0])
    np.testing.assert_array_equal(labels, y)
    with h5py.File(path, "r") as h5:
        assert h5["test"].attrs["views"] == 1  # a version 2 file states the views of every split


def test_blocks_and_row_ranges_cut_anywhere_read_the_same_rows(view_file):
    path, (x, _), _ = view_file
    with FeatureFile(path) as handle:
        split = handle.split("train")
        for block_rows in (1, 2, 4, 7, 100):
            blocks = [f for f, _ in split.blocks(block_rows)]
            np.testing.assert_array_equal(np.concatenate(blocks), x.reshape(-1, D))
        part = split.rows(3, 12)
        assert part.views_per_example == V and part.num_examples == 9
        np.testing.assert_array_equal(np.concatenate([f for f, _ in part.blocks(4)]), x[1:4].reshape(-1, D))


@pytest.mark.parametrize("start, stop", [(1, 12), (3, 13), (4, 5)])
def test_a_row_range_that_splits_an_example_is_refused(view_file, start, stop):
    path, _, _ = view_file
    with FeatureFile(path) as handle, pytest.raises(ValueError, match=rf"rows \[{start}, {stop}\).*multiples of 3"):
        handle.split("train").rows(start, stop)


# --- refusals when opening and reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [
    (np.int64(0), "0 (int64)"),
    (np.int64(-1), "-1 (int64)"),
    (np.float64(3.0), "3.0 (float64)"),
    ("3", "'3' (str)"),
    (np.int64(MAX_VIEWS + 1), f"{MAX_VIEWS + 1} (int64)"),
])
def test_a_views_attribute_that_is_not_an_integer_in_range_is_refused(view_file, value, shown):
    path, _, _ = view_file
    _set(path, "train", views=value)
    with FeatureFile(path) as handle, pytest.raises(FeatureFileError) as error:
        handle.split("train")
    assert "'views'" in str(error.value) and shown in str(error.value)


def test_num_examples_not_a_multiple_of_views_is_refused(view_file):
    path, _, _ = view_file
    _set(path, "train", views=np.int64(5))  # 24 rows are not whole examples of 5
    with FeatureFile(path) as handle, pytest.raises(FeatureFileError, match=r"num_examples=24 .*views=5"):
        handle.split("train")


def test_rows_done_not_a_multiple_of_views_is_refused(tmp_path):
    path = tmp_path / "partial.h5"
    x, y = _views(4)
    with FeatureWriter(path, feature_dim=D, num_classes=K) as writer:
        writer.create_split("train", 4 * V, views=V)
        writer.append("train", x[:2].reshape(-1, D), np.repeat(y[:2], V), np.repeat(np.arange(2), V))
    with FeatureFile(path) as handle:
        assert handle.split("train", require_complete=False).num_examples == 2 * V
    _set(path, "train", rows_done=np.int64(4))
    with FeatureFile(path) as handle, pytest.raises(FeatureFileError, match=r"rows_done=4 must be multiples"):
        handle.split("train", require_complete=False)


def test_views_of_one_example_with_different_labels_are_refused_naming_the_row(view_file):
    path, _, (_, y) = view_file
    with h5py.File(path, "r") as h5:
        labels = h5["train/labels"][...]
    labels[4] = (labels[4] + 1) % K  # row 4: view 1 of example 1
    _set(path, "train", labels=labels)
    message = rf"split 'train', row 4: label {labels[4]} differs from label {labels[3]} of row 3.*example 1"
    with FeatureFile(path) as handle:
        split = handle.split("train")
        with pytest.raises(FeatureFileError, match=message):
            split.read()
        with pytest.raises(FeatureFileError, match=message):
            split.read(block_rows=4)  # the block [4, 8) begins inside example 1
        for block_rows in (2, 4):  # row 4 first in a block: compared with row 3 of the block before
            with pytest.raises(FeatureFileError, match=message):
                list(split.blocks(block_rows))
        list(split.rows(6, 24).blocks(5))  # examples 2..7 are intact
        np.testing.assert_array_equal(handle.split("test").read()[1], y)  # one-view splits are not grouped


def test_views_of_one_example_with_different_index_are_refused(view_file):
    path, _, _ = view_file
    index = np.repeat(np.arange(8), V)
    index[23] = 8
    _set(path, "train", index=index)
    with FeatureFile(path) as handle, pytest.raises(FeatureFileError, match=r"row 23: index 8 differs from index 7"):
        handle.split("train").read_index()


# --- refusals when writing ---------------------------------------------------------------------------------------


def test_appending_part_of_an_example_is_refused(tmp_path):
    x, y = _views(2)
    with FeatureWriter(tmp_path / "f.h5", feature_dim=D, num_classes=K) as writer:
        writer.create_split("train", 2 * V, views=V)
        with pytest.raises(FeatureFileError, match=r"appending 2 rows at row 0, not whole examples.*views=3"):
            writer.append("train", x[0, :2], np.repeat(y[0], 2), np.zeros(2, np.int64))
        labels = np.repeat(y, V)
        labels[2] = (labels[2] + 1) % K
        with pytest.raises(FeatureFileError, match=rf"row 2: label {labels[2]} differs from label {labels[1]}"):
            writer.append("train", x.reshape(-1, D), labels, np.repeat(np.arange(2), V))
        with pytest.raises(FeatureFileError, match=r"row 4: index 0 differs from index 1 of row 3"):
            writer.append("train", x.reshape(-1, D), np.repeat(y, V), np.array([0, 0, 0, 1, 0, 1]))
        assert writer.rows_done("train") == 0  # nothing of a refused append is kept
        assert writer.append("train", x[0], np.repeat(y[0], V), np.zeros(V, np.int64)) == V


@pytest.mark.parametrize("rows, views, fragment", [
    (10, 3, "num_examples=10 rows is not a whole number of examples of views=3"),
    (9, 0, "views=0 must be an integer in [1, 1024]"),
    (9, -3, "views=-3 must be an integer"),
    (9, True, "views=True must be an integer"),
    (9, 2.0, "views=2.0 must be an integer"),
])
def test_create_split_refuses_views_that_do_not_make_whole_examples(tmp_path, rows, views, fragment):
    with FeatureWriter(tmp_path / "f.h5", feature_dim=D, num_classes=K) as writer:
        with pytest.raises(FeatureFileError) as error:
            writer.create_split("train", rows, views=views)
    assert fragment in str(error.value)


@pytest.mark.parametrize("first, again", [(3, 1), (1, 3), (3, 2)])
def test_resuming_a_split_with_other_views_is_refused(tmp_path, first, again):
    path = tmp_path / "f.h5"
    with FeatureWriter(path, feature_dim=D, num_classes=K) as writer:
        writer.create_split("train", 6, views=first)
    with FeatureWriter(path, feature_dim=D, num_classes=K) as writer:
        with pytest.raises(FeatureFileError, match=rf"exists with views={first} per example, requested views={again}"):
            writer.create_split("train", 6, views=again)
        assert writer.create_split("train", 6, views=first) == 0  # the same views resume


def test_write_features_refuses_a_split_of_no_views(tmp_path):
    with pytest.raises(FeatureFileError, match=r"views=0"):
        write_features(tmp_path / "f.h5", {"train": (np.zeros((4, 0, D), np.float32), np.zeros(4, int))},
                       num_classes=K)
    assert list(tmp_path.iterdir()) == []


# --- sharded files -----------------------------------------------------------------------------------------------


def test_a_sharded_view_file_reads_like_the_whole_file_and_its_parts_hold_whole_examples(tmp_path):
    x, y = _views(7)
    path = write_parts(tmp_path / "p.h5", {"train": (x, y), "test": (x[:, 0], y)}, 3, chunk_rows=2)
    with FeatureFile(path) as handle:
        split = handle.split("train")
        assert split.views_per_example == V and handle.split("test").views_per_example == 1
        assert "views_per_example=3" in repr(split)
        np.testing.assert_array_equal(split.read()[0], x.reshape(-1, D))
        np.testing.assert_array_equal(np.concatenate([f for f, _ in split.blocks(5)]), x.reshape(-1, D))
        np.testing.assert_array_equal(split.read_index(), np.repeat(np.arange(7), V))
        np.testing.assert_array_equal(np.concatenate([f for f, _ in split.rows(6, 15).blocks(4)]),
                                      x[2:5].reshape(-1, D))
        with pytest.raises(ValueError, match=r"multiples of 3"):
            split.rows(0, 8)
    for i, examples in enumerate((2, 2, 3)):  # row_range(7, i, 3) counts examples; a part holds 3 rows of each
        with FeatureFile(part_path(path, i, 3)) as part:
            assert part.split("train").num_examples == examples * V
            examples_held = np.arange(2 * i, 2 * i + examples)
            np.testing.assert_array_equal(part.split("train").read_index(), np.repeat(examples_held, V))


def test_a_part_that_disagrees_on_views_is_refused(tmp_path):
    x, y = _views(6)
    path = write_parts(tmp_path / "p.h5", {"train": (x, y)}, 2)  # 9 rows per part
    with h5py.File(part_path(path, 1, 2), "r+") as h5:
        h5["train"].attrs.modify("views", np.int64(9))  # in place: the part keeps the size the manifest records
    with pytest.raises(FeatureFileError, match=r"part-00001-of-00002.h5, split 'train': holds 9 views per example, "
                                               r"the manifest records 3"):
        FeatureFile(path)


# --- featdp info -------------------------------------------------------------------------------------------------


def test_info_shows_views_and_examples_of_a_view_split_and_nothing_new_for_one_view(view_file, tmp_path):
    path, _, _ = view_file
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "split" in line and "dtype" in line)
    assert "views" in header
    train = next(line for line in result.output.splitlines() if line.split("│")[1:2] == [" train "])
    assert "8 (24 rows)" in train and " 3 " in train, result.output
    test = next(line for line in result.output.splitlines() if line.split("│")[1:2] == [" test  "])
    assert "rows" not in test and " 1 " in test, result.output

    plain = write_features(tmp_path / "plain.h5", {"train": (_views(4)[0][:, 0], np.zeros(4, int))}, num_classes=K)
    result = CliRunner().invoke(app, ["info", str(plain)])
    assert result.exit_code == 0, result.output
    # The split table only: the title is the file's path, which holds this test's name (and so "views").
    lines = result.output.splitlines()
    header = next(line for line in lines if "split" in line and "dtype" in line)
    train = next(line for line in lines if line.split("│")[1:2] == [" train "])
    assert "views" not in header and "rows" not in train, result.output


def test_info_shows_an_unfinished_view_split_in_examples_and_rows(tmp_path):
    path = tmp_path / "partial.h5"
    x, y = _views(5)
    with FeatureWriter(path, feature_dim=D, num_classes=K) as writer:
        writer.create_split("train", 5 * V, views=V)
        writer.append("train", x[:2].reshape(-1, D), np.repeat(y[:2], V), np.repeat(np.arange(2), V))
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "train" in line)
    assert "2 of 5 (6 of 15 rows)" in row and "unfinished" in row, result.output


def test_a_file_with_views_declares_format_version_2_and_a_version_1_file_may_not_hold_views(tmp_path):
    import h5py

    from featdp.featurefile import FeatureFile, FeatureFileError, write_features

    x = np.zeros((4, 2, 3), np.float32)
    path = write_features(tmp_path / "v.h5", {"train": (x, np.zeros(4, int)), "test": (x[:, 0], np.zeros(4, int))})
    with h5py.File(path, "r") as h5:
        assert h5.attrs["format_version"] == 2
    one = write_features(tmp_path / "one.h5", {"train": (x[:, 0], np.zeros(4, int))})
    with h5py.File(one, "r") as h5:
        assert h5.attrs["format_version"] == 1  # a one-view file is written exactly as before views existed
        assert "views" not in h5["train"].attrs
    with h5py.File(path, "r+") as h5:
        h5.attrs["format_version"] = np.int64(1)  # what a featdp that predates views would accept
    with pytest.raises(FeatureFileError, match="declares views=2, but the file's format_version 1"):
        with FeatureFile(path) as features:
            features.split("train")


def test_a_split_of_a_version_2_file_without_its_views_attribute_is_refused(tmp_path):
    x = np.zeros((4, 2, 3), np.float32)
    path = write_features(tmp_path / "v.h5", {"train": (x, np.zeros(4, int)), "test": (x[:, 0], np.zeros(4, int))})
    with h5py.File(path, "r") as h5:
        assert h5["test"].attrs["views"] == 1 and h5["train"].attrs["views"] == 2  # stated on every split
    with h5py.File(path, "r+") as h5:
        del h5["train"].attrs["views"]  # would read as 8 one-view examples
    with pytest.raises(FeatureFileError, match="split 'train' of a format_version 2 file lacks its 'views'"):
        with FeatureFile(path) as features:
            features.split("train")


def test_the_manifest_records_views_and_refuses_a_part_that_holds_another_number(tmp_path):
    x, y = np.arange(6 * 3 * 2, dtype=np.float32).reshape(6, 3, 2), np.arange(6) % 2
    path = write_parts(tmp_path / "p.h5", {"train": (x, y)}, 2)
    with FeatureFile(path) as features:
        assert features.split("train").views_per_example == 3
    part = part_path(path, 1, 2)
    with h5py.File(part, "r+") as h5:  # one view per row, as a featdp before views would have written it
        del h5["train"].attrs["views"]
        h5.attrs["format_version"] = np.int64(1)
    with pytest.raises(FeatureFileError, match="holds 1 views per example, the manifest records 3"):
        FeatureFile(path).close()
