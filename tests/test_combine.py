"""`featdp combine`: feature files of different backbones joined row by row, or refused with nothing written."""

from __future__ import annotations


import h5py
import numpy as np
import pytest

from conftest import invoke
from featdp import featurefile_parts as parts
from featdp.combine import CombineError, combine, parse_weights
from featdp.featurefile import FeatureFile, FeatureFileError, write_features


def _examples(n, d, seed, k=3, scale=1.0):
    rng = np.random.default_rng(seed)
    return (scale * rng.normal(size=(n, d))).astype(np.float32), rng.integers(0, k, size=n)


def _pair(tmp_path, n=50, test=12, k=3, **second):
    """Two feature files of the same examples (labels, index, dataset), of different widths and scales."""
    (xa, y), (xt_a, yt) = _examples(n, 5, 0, k), _examples(test, 5, 1, k)
    xb, xt_b = _examples(n, 7, 2, k, scale=40.0)[0], _examples(test, 7, 3, k, scale=40.0)[0]
    a = write_features(tmp_path / "a.h5", {"train": (xa, y), "test": (xt_a, yt)}, num_classes=k, dtype="float32",
                       backbone="alpha", dataset="blobs")
    meta = dict(backbone="beta", dataset="blobs", dtype="float16")
    meta.update(second)
    b = write_features(tmp_path / "b.h5", {"train": (xb, y), "test": (xt_b, yt)}, num_classes=k, **meta)
    return a, b, (xa, xb, y), (xt_a, xt_b, yt)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _no_output_left(directory, out):
    assert not out.exists()
    assert not [p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".lock"))]


def test_rows_join_each_source_rescaled_to_its_share_of_a_unit_norm(tmp_path):
    a, b, (xa, xb, y), (xt_a, xt_b, yt) = _pair(tmp_path)
    out = combine(tmp_path / "ab.h5", [a, b], weights=[1, 3])
    b16 = xb.astype(np.float16).astype(np.float32)  # b stores float16: that is what combine reads
    with FeatureFile(out) as joined:
        meta = joined.metadata
        assert meta.feature_dim == 12 and meta.backbone == "alpha+beta" and meta.dataset == "blobs"
        assert [s["weight"] for s in meta.preprocessing["combined"]] == [0.25, 0.75]
        assert [s["feature_dim"] for s in meta.preprocessing["combined"]] == [5, 7]
        x, labels = joined.split("train").read()
        assert joined.split("train").dtype == np.float32  # one float32 source keeps float32
        np.testing.assert_array_equal(labels, y)
        np.testing.assert_array_equal(joined.split("train").read_index(), np.arange(len(y)))
        np.testing.assert_allclose(x[:, :5], np.sqrt(0.25) * _unit(xa), atol=1e-6)
        np.testing.assert_allclose(x[:, 5:], np.sqrt(0.75) * _unit(b16), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
        xt, _ = joined.split("test").read()
        np.testing.assert_allclose(xt[:, 5:], np.sqrt(0.75) * _unit(xt_b.astype(np.float16).astype(np.float32)),
                                   atol=1e-6)


def test_equal_shares_by_default_blocks_across_reads_and_a_zero_row_stays_zero(tmp_path):
    (xa, y), (xb, _) = _examples(40, 4, 0), _examples(40, 6, 1)
    xb[17] = 0
    a = write_features(tmp_path / "a.h5", {"train": (xa, y)}, num_classes=3, dtype="float16")
    b = write_features(tmp_path / "b.h5", {"train": (xb, y)}, num_classes=3, dtype="float16")
    out = combine(tmp_path / "ab.h5", [a, b], block_rows=7)  # blocks that end mid-file
    with FeatureFile(out) as joined:
        x, _ = joined.split("train").read()
        assert joined.split("train").dtype == np.float16
    norms = np.linalg.norm(x[:, :4], axis=1), np.linalg.norm(x[:, 4:], axis=1)
    np.testing.assert_allclose(norms[0], np.sqrt(0.5), atol=1e-3)
    np.testing.assert_allclose(np.delete(norms[1], 17), np.sqrt(0.5), atol=1e-3)
    assert not x[17, 4:].any() and norms[0][17] > 0


def test_a_sharded_source_combines_like_the_whole_file(tmp_path):
    (x, y), (xo, _) = _examples(31, 5, 0), _examples(31, 3, 1)
    whole = write_features(tmp_path / "whole.h5", {"train": (x, y)}, num_classes=3)
    sharded = parts.write_parts(tmp_path / "sharded.h5", {"train": (x, y)}, 3, num_classes=3, chunk_rows=4)
    other = write_features(tmp_path / "other.h5", {"train": (xo, y)}, num_classes=3)
    results = []
    for source, name in [(whole, "w.h5"), (sharded, "s.h5")]:
        with FeatureFile(combine(tmp_path / name, [source, other])) as joined:
            results.append(joined.split("train").read())
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def _rewrite(path, split, name, change):
    with h5py.File(path, "r+") as h5:
        values = h5[split][name][:]
        change(values)
        h5[split][name][:] = values


@pytest.mark.parametrize("what, change, message", [
    ("labels", lambda v: v.__setitem__(9, (v[9] + 1) % 3), "split 'train', row 9: label"),
    ("index", lambda v: v.__setitem__(slice(3, 5), v[3:5][::-1].copy()), "split 'train', row 3: index"),
])
def test_sources_that_disagree_row_by_row_are_refused_naming_the_row(tmp_path, what, change, message):
    a, b, *_ = _pair(tmp_path)
    _rewrite(b, "train", what, change)
    out = tmp_path / "ab.h5"
    with pytest.raises(CombineError, match=message):
        combine(out, [a, b], block_rows=4)
    _no_output_left(tmp_path, out)


@pytest.mark.parametrize("other, message", [
    (dict(dataset="other"), "differ in dataset"),
    (dict(class_names=["x", "y", "z"]), "differ in class_names"),
    (dict(source_fingerprint={"source": "else"}), "source fingerprints differ"),
])
def test_sources_of_different_examples_are_refused(tmp_path, other, message):
    _, b, (_, _, y), (_, _, yt) = _pair(tmp_path, source_fingerprint={"source": "one"})
    meta = dict(dataset="blobs", source_fingerprint={"source": "one"}) | other
    a = write_features(tmp_path / "c.h5", {"train": (_examples(50, 5, 0)[0], y), "test": (_examples(12, 5, 1)[0], yt)},
                       num_classes=3, backbone="gamma", **meta)
    with pytest.raises(CombineError, match=message):
        combine(tmp_path / "out.h5", [a, b])
    _no_output_left(tmp_path, tmp_path / "out.h5")


def test_different_splits_row_counts_and_views_are_refused(tmp_path):
    a, b, (xa, xb, y), (_, xt_b, yt) = _pair(tmp_path)
    only_train = write_features(tmp_path / "t.h5", {"train": (xb, y)}, num_classes=3, dataset="blobs")
    with pytest.raises(CombineError, match="splits"):
        combine(tmp_path / "o.h5", [a, only_train])
    fewer = write_features(tmp_path / "f.h5", {"train": (xb[:-1], y[:-1]), "test": (xt_b, yt)},
                           num_classes=3, dataset="blobs")
    with pytest.raises(CombineError, match="split 'train' has 49 rows"):
        combine(tmp_path / "o.h5", [a, fewer])
    views = write_features(tmp_path / "v.h5", {"train": (np.stack([xb, xb], axis=1), y),
                                               "test": (xt_b, yt)}, num_classes=3, dataset="blobs")
    with pytest.raises(CombineError, match="2 augmented views per example"):
        combine(tmp_path / "o.h5", [views, a])
    _no_output_left(tmp_path, tmp_path / "o.h5")


def test_the_request_itself_is_checked(tmp_path):
    a, b, *_ = _pair(tmp_path)
    with pytest.raises(CombineError, match="at least two"):
        combine(tmp_path / "o.h5", [a])
    with pytest.raises(CombineError, match="given twice"):
        combine(tmp_path / "o.h5", [a, tmp_path / "." / "a.h5"])
    with pytest.raises(CombineError, match="replace one of its own sources"):
        combine(b, [a, b], overwrite=True)
    with pytest.raises(CombineError, match="positive"):
        combine(tmp_path / "o.h5", [a, b], weights=[1, 0])
    existing = tmp_path / "o.h5"
    existing.write_bytes(b"keep")
    with pytest.raises(FeatureFileError, match="file exists"):
        combine(existing, [a, b])
    assert existing.read_bytes() == b"keep"
    combine(existing, [a, b], overwrite=True)
    with pytest.raises(FeatureFileError, match="is a directory"):
        combine(tmp_path, [a, b], overwrite=True)
    with FeatureFile(existing) as joined:
        assert joined.metadata.feature_dim == 12


@pytest.mark.parametrize("text, count, expected", [
    (None, 3, (1 / 3,) * 3), ("1,3", 2, (0.25, 0.75)), (" 2 , 2 ", 2, (0.5, 0.5)), ("1e308,1e308", 2, (0.5, 0.5)),
])
def test_parse_weights(text, count, expected):
    np.testing.assert_allclose(parse_weights(text, count), expected)


@pytest.mark.parametrize("text, message", [
    ("1,x", "'x' is not a number"), ("1,-1", "positive finite"), ("1,nan", "positive finite"),
    ("1", "1 weights"), ("1,1,1", "3 weights"), ("1e-320,1", "below 1e-06 of the largest"),
])
def test_parse_weights_refuses(text, message):
    with pytest.raises(CombineError, match=message):
        parse_weights(text, 2)


def test_cli_combines_and_the_result_fits(tmp_path):
    a, b, *_ = _pair(tmp_path)
    out = tmp_path / "ab.h5"
    result = invoke("combine", a, b, "--out", out, "--weights", "1,1")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "feature dim 12" in result.output
    info = invoke("info", out)
    assert info.exit_code == 0 and "alpha+beta" in info.output
    sources = [line.split("│")[1:-1] for line in info.output.splitlines()
               if line.startswith("│") and line.split("│")[1].strip() in ("a.h5", "b.h5")]
    assert [[cell.strip() for cell in row] for row in sources] == [["a.h5", "alpha", "5", "0.5"],
                                                                   ["b.h5", "beta", "7", "0.5"]]
    fitted = invoke("fit", out, "--method", "dp-sgd", "--eps", "1", "--seed", "0", "--out", tmp_path / "head")
    assert fitted.exit_code == 0, fitted.output
    assert np.load(tmp_path / "head" / "head.npz")["weights"].shape[0] == 12


@pytest.mark.parametrize("args, message", [
    (["--weights", "1,2,3"], "--weights gives 3 weights"),
    (["--weights", "1,zero"], "'zero' is not a number"),
])
def test_cli_bad_input_is_one_error_line_with_exit_code_2(tmp_path, args, message):
    a, b, *_ = _pair(tmp_path)
    out = tmp_path / "ab.h5"
    result = invoke("combine", a, b, "--out", out, *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error:") and message in result.output
    _no_output_left(tmp_path, out)


def test_cli_refuses_a_missing_or_foreign_source_naming_it(tmp_path):
    a, _, *_ = _pair(tmp_path)
    missing = tmp_path / "missing.h5"
    result = invoke("combine", a, missing, "--out", tmp_path / "ab.h5")
    assert result.exit_code == 2 and str(missing) in result.output and "Traceback" not in result.output
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not hdf5")
    result = invoke("combine", a, foreign, "--out", tmp_path / "ab.h5")
    assert result.exit_code == 2 and str(foreign) in result.output
    _no_output_left(tmp_path, tmp_path / "ab.h5")


def test_an_output_in_a_sharded_sources_parts_or_linked_to_a_source_is_refused(tmp_path):
    (x, y), (xo, _) = _examples(20, 5, 0), _examples(20, 3, 1)
    sharded = parts.write_parts(tmp_path / "sharded.h5", {"train": (x, y)}, 2, num_classes=3)
    other = write_features(tmp_path / "other.h5", {"train": (xo, y)}, num_classes=3)
    part = next(parts.parts_dir(sharded).iterdir())
    before = part.read_bytes()
    with pytest.raises(CombineError, match="a part of a sharded source"):
        combine(part, [sharded, other], overwrite=True)
    assert part.read_bytes() == before
    link = tmp_path / "link.h5"
    link.symlink_to(other)
    with pytest.raises(CombineError, match="replace one of its own sources"):
        combine(link, [sharded, other], overwrite=True)


def test_a_mismatch_in_a_later_split_is_found_before_anything_is_written_and_an_old_output_survives(
        tmp_path, monkeypatch):
    a, b, *_ = _pair(tmp_path)
    out = combine(tmp_path / "ab.h5", [a, b])
    before = out.read_bytes()
    _rewrite(b, "train", "index", lambda v: v.__setitem__(0, 999))  # "test" comes first, "train" second
    writes = []
    import featdp.combine

    real = featdp.combine._combine_split
    monkeypatch.setattr(featdp.combine, "_combine_split",
                        lambda *args, **kwargs: writes.append(args[1]) or real(*args, **kwargs))
    with pytest.raises(CombineError, match="split 'train', row 0: index 999"):
        combine(out, [a, b], overwrite=True)
    assert writes == [] and out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".lock"))]


def test_an_empty_split_combines_to_an_empty_split(tmp_path):
    (xa, y), (xb, _) = _examples(10, 4, 0), _examples(10, 6, 1)
    empty = lambda d: (np.zeros((0, d), np.float32), np.zeros(0, np.int64))  # noqa: E731
    a = write_features(tmp_path / "a.h5", {"train": (xa, y), "extra": empty(4)}, num_classes=3)
    b = write_features(tmp_path / "b.h5", {"train": (xb, y), "extra": empty(6)}, num_classes=3)
    with FeatureFile(combine(tmp_path / "ab.h5", [a, b])) as joined:
        assert joined.split("extra").num_examples == 0 and joined.split("train").num_examples == 10


def test_a_failing_rename_is_an_error_naming_the_destination_and_leaves_nothing(tmp_path, monkeypatch):
    import os

    a, b, *_ = _pair(tmp_path)
    out = tmp_path / "ab.h5"
    out.write_bytes(b"old")

    def refuse(src, dst):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(FeatureFileError, match=f"{out}: cannot write it: Permission denied"):
        combine(out, [a, b], overwrite=True)
    with pytest.raises(FeatureFileError, match="cannot write it"):
        write_features(tmp_path / "w.h5", {"train": _examples(5, 2, 0)}, num_classes=3)
    assert out.read_bytes() == b"old" and not (tmp_path / "w.h5").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".lock"))]


def test_a_write_that_fails_midway_is_an_error_naming_the_destination_and_leaves_nothing(tmp_path, monkeypatch):
    from featdp.featurefile import FeatureWriter

    a, b, *_ = _pair(tmp_path)

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureWriter, "append", full_disk)
    out = tmp_path / "ab.h5"
    with pytest.raises(FeatureFileError, match=f"{out}: cannot write it: .*No space left on device"):
        combine(out, [a, b])
    _no_output_left(tmp_path, out)
