"""Feature files from anyone, crashes and concurrent runs: nothing leaked, nothing mixed, nothing half-written.

* A feature file cannot make featdp read other files (external storage, external or soft links, virtual
  datasets are refused when the file is opened).
* Declared sizes are checked against what the file holds, attributes against their types, and large
  allocations against the memory available.
* A resumed write refuses a source that changed since the file was created.
* A file being written by another process is reported as in use, and a second writer is stopped by
  featdp's own lock even where HDF5's locking is off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from featdp.data import DataError
from featdp.featurefile import (
    AllocationError,
    FeatureFile,
    FeatureFileError,
    FeatureFileLock,
    FeatureWriter,
    FileInUseError,
    available_memory,
    check_allocation,
    lock_path,
    write_features,
)
from featdp_cli.main import app

D, K = 6, 4
N_TRAIN, N_TEST = 30, 10
SECRET = b"root:x:0:0:SECRET-CONTENT-THAT-MUST-NOT-LEAK:/root:/bin/sh\n" * 20  # 1200 bytes


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, D)).astype(np.float32), rng.integers(0, K, n)


def _good_file(tmp_path, name="f.h5"):
    return write_features(tmp_path / name, {"train": _data(N_TRAIN), "test": _data(N_TEST, 1)}, num_classes=K,
                          dataset="toy")


# --- 1. storage outside the file ------------------------------------------------------------------------


def _secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    return path


def _other_h5(tmp_path):
    """Another HDF5 file, holding what a crafted feature file would borrow."""
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = np.ones((N_TRAIN, D), np.float32)
        h5["train/features"] = np.ones((N_TRAIN, D), np.float32)
        h5["train/labels"] = np.zeros(N_TRAIN, np.int32)
        h5["train/index"] = np.arange(N_TRAIN)
        h5["train"].attrs.update({"num_examples": N_TRAIN, "rows_done": N_TRAIN, "complete": True})
    return path


def _external_storage(h5, tmp_path):
    secret = _secret(tmp_path)
    del h5["train/labels"]
    # The labels' bytes come from the secret file: out-of-range labels would print them in an error.
    h5["train"].create_dataset("labels", shape=(N_TRAIN,), dtype=np.int32, external=[(str(secret), 0, N_TRAIN * 4)])
    return f"/train/labels has external storage in '{secret}'"


def _external_storage_features(h5, tmp_path):
    secret = _secret(tmp_path)
    del h5["train/features"]
    h5["train"].create_dataset("features", shape=(N_TRAIN, D), dtype=np.float32,
                               external=[(str(secret), 0, N_TRAIN * D * 4)])
    return f"/train/features has external storage in '{secret}'"


def _external_link_dataset(h5, tmp_path):
    other = _other_h5(tmp_path)
    del h5["train/features"]
    h5["train/features"] = h5py.ExternalLink(str(other), "/features")
    return f"/train/features is an external link to '/features' in file '{other}'"


def _external_link_split(h5, tmp_path):
    other = _other_h5(tmp_path)
    del h5["train"]
    h5["train"] = h5py.ExternalLink(str(other), "/train")
    return f"/train is an external link to '/train' in file '{other}'"


def _soft_link(h5, tmp_path):
    h5["elsewhere/labels"] = np.zeros(N_TRAIN, np.int32)
    del h5["train/labels"]
    h5["train/labels"] = h5py.SoftLink("/elsewhere/labels")
    return "/train/labels is a soft link to '/elsewhere/labels'"


def _virtual_missing_source(h5, tmp_path):
    layout = h5py.VirtualLayout(shape=(N_TRAIN, D), dtype=np.float32)
    layout[:] = h5py.VirtualSource(str(tmp_path / "missing.h5"), "data", shape=(N_TRAIN, D))
    del h5["train/features"]
    h5["train"].create_virtual_dataset("features", layout, fillvalue=0)
    return f"/train/features is a virtual dataset mapping {tmp_path / 'missing.h5'}:data"


CRAFTS = [_external_storage, _external_storage_features, _external_link_dataset, _external_link_split, _soft_link,
          _virtual_missing_source]


@pytest.mark.parametrize("craft", CRAFTS, ids=lambda f: f.__name__.strip("_"))
def test_storage_outside_the_file_is_refused_at_open(tmp_path, craft):
    path = _good_file(tmp_path)
    with h5py.File(path, "r+") as h5:
        fragment = craft(h5, tmp_path)
    with pytest.raises(FeatureFileError, match="stored inside the feature file itself") as info:
        FeatureFile(path)
    assert fragment in str(info.value)
    assert "SECRET" not in str(info.value)
    with pytest.raises(FeatureFileError, match="stored inside the feature file itself"):  # nor resumed
        FeatureWriter(path, feature_dim=D, num_classes=K, dataset="toy")


def test_fit_on_a_file_borrowing_another_files_bytes_is_an_error_line(tmp_path):
    path = _good_file(tmp_path)
    with h5py.File(path, "r+") as h5:
        _external_storage(h5, tmp_path)
    result = CliRunner().invoke(app, ["fit", str(path), "--eps", "1", "--out", str(tmp_path / "head")])
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert "external storage" in result.output and "SECRET" not in result.output
    assert not (tmp_path / "head").exists()


# --- 2. declared sizes and attribute types ----------------------------------------------------------------


def test_num_classes_must_match_class_names(tmp_path):
    path = _good_file(tmp_path)
    with h5py.File(path, "r+") as h5:
        h5.attrs["num_classes"] = np.int64(10**9)
        h5.attrs["class_names"] = "[]"
    with pytest.raises(FeatureFileError, match="num_classes=1000000000 but class_names lists 0 names"):
        FeatureFile(path)


@pytest.mark.parametrize(
    "group, name, value, fragment",
    [
        ("/", "feature_dim", "six", "'feature_dim' must be an integer, got 'six'"),
        ("/", "feature_dim", 6.0, "'feature_dim' must be an integer, got 6.0"),
        ("/", "num_classes", np.array([4, 4]), "'num_classes' must be an integer"),
        ("/", "image_size", "224", "'image_size' must be an integer, got '224'"),
        ("/", "format_version", np.array([1, 1]), "unsupported format_version"),
        ("/", "backbone", 5, "'backbone' must be a string, got 5"),
        ("/", "class_names", 7, "'class_names' must be a string, got 7"),
        ("/", "class_names", '["a", "b", 3, "d"]', "'class_names' must be a JSON list of strings, holds 3"),
        ("/", "preprocessing", "[1]", "'preprocessing' must be a JSON object"),
        ("train", "num_examples", "30", "split 'train' attribute 'num_examples' must be an integer, got '30'"),
        ("train", "rows_done", 29.5, "'rows_done' must be an integer, got 29.5"),
        ("train", "complete", "yes", "'complete' must be a boolean, got 'yes'"),
    ],
)
def test_an_attribute_of_the_wrong_type_is_an_error_line(tmp_path, group, name, value, fragment):
    path = _good_file(tmp_path)
    with h5py.File(path, "r+") as h5:
        h5[group].attrs[name] = value
    with pytest.raises(FeatureFileError) as info:
        with FeatureFile(path) as f:
            f.split("train").read()
    assert fragment in str(info.value)
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output, result.output


def test_a_tiny_file_cannot_declare_a_huge_feature_dim(tmp_path):
    # ~10 KB on disk, declaring 10^6 features per row: HDF5 would answer reads with zeros, and a fit would
    # ask for a d x d Gram matrix of 7.3 TiB.
    d = 10**6
    path = tmp_path / "huge.h5"
    write_features(path, {"train": _data(2)}, num_classes=K)
    with h5py.File(path, "r+") as h5:
        del h5["train/features"]
        h5["train"].create_dataset("features", shape=(2, d), dtype=np.float32, chunks=(1, d))
        h5.attrs["feature_dim"] = np.int64(d)
    assert path.stat().st_size < 64 * 1024
    with FeatureFile(path) as f:
        assert f.metadata.feature_dim == d
        with pytest.raises(FeatureFileError, match=r"features declares shape \(2, 1000000\) float32.*7\.6 MiB.*"
                                                   r"stores only 0 bytes"):
            f.split("train")


def test_a_tiny_file_cannot_declare_a_billion_rows(tmp_path):
    n = 10**9
    path = tmp_path / "rows.h5"
    write_features(path, {"train": _data(2)}, num_classes=K)
    with h5py.File(path, "r+") as h5:
        for name, dtype, shape in (("features", np.float32, (n, D)), ("labels", np.int32, (n,)),
                                   ("index", np.int64, (n,))):
            del h5[f"train/{name}"]
            h5["train"].create_dataset(name, shape=shape, dtype=dtype, chunks=(min(n, 4096),) + shape[1:])
        h5["train"].attrs.update({"num_examples": np.int64(n), "rows_done": np.int64(n)})
    with FeatureFile(path) as f:
        with pytest.raises(FeatureFileError, match=r"features declares shape \(1000000000, 6\)"):
            f.split("train")


def test_index_must_be_integers(tmp_path):
    path = _good_file(tmp_path)
    with h5py.File(path, "r+") as h5:
        del h5["train/index"]
        h5["train/index"] = np.linspace(0, 1, N_TRAIN)
    with FeatureFile(path) as f, pytest.raises(FeatureFileError, match="index float64 unsupported"):
        f.split("train")


def test_check_allocation_names_the_size_and_the_memory_available():
    gram = 10**6 * 10**6 * 8  # a float64 d x d matrix at d = 10^6
    with pytest.raises(AllocationError) as info:
        check_allocation(gram, "the 1000000 x 1000000 Gram matrix")
    message = str(info.value)
    assert message.startswith("the 1000000 x 1000000 Gram matrix needs 7.3 TiB (8000000000000 bytes)"), message
    assert "is available" in message
    assert isinstance(info.value, FeatureFileError) and isinstance(info.value, DataError)  # CLI: error line
    with pytest.raises(AllocationError, match=r"x needs 2\.0 KiB \(2048 bytes\) of memory, but only 1\.0 KiB is"):
        check_allocation(2048, "x", available=1024)
    check_allocation(1024, "x", available=1024)
    check_allocation(1 << 20, "a small buffer")
    available = available_memory()
    assert available is None or available > 1 << 20


def test_a_read_larger_than_memory_stops_with_a_message(tmp_path, monkeypatch):
    import featdp.featurefile as featurefile

    path = _good_file(tmp_path)
    monkeypatch.setattr(featurefile, "available_memory", lambda: 100)  # the 30 rows take 30 x (4·D + 8) bytes
    monkeypatch.setattr(featurefile, "_CHECKED_READ_BYTES", 0)
    with FeatureFile(path) as f, pytest.raises(AllocationError, match=r"reading rows \[0, 30\) of split 'train'"):
        f.split("train").read()


# --- 3. resuming onto a changed source ------------------------------------------------------------------

FINGERPRINT = {"source": "folder", "splits": {"train": {"files": 3, "bytes": 100, "sizes_and_mtimes_sha256": "a" * 64}}}


def _changed(**train):
    return {"source": "folder", "splits": {"train": {**FINGERPRINT["splits"]["train"], **train}}}


def test_resuming_onto_a_changed_source_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "f.h5"
    meta = dict(feature_dim=D, num_classes=K, dataset="folder:/data/pets")
    with FeatureWriter(path, source_fingerprint=FINGERPRINT, **meta) as w:
        w.create_split("train", 10)
        w.append("train", *_data(4), np.arange(4))
    with FeatureFile(path) as f:
        assert f.metadata.source_fingerprint == FINGERPRINT
    with FeatureWriter(path, source_fingerprint=FINGERPRINT, **meta) as w:  # same source: resumes
        assert w.create_split("train", 10) == 4
    changed = _changed(bytes=120, sizes_and_mtimes_sha256="b" * 64)
    with pytest.raises(FeatureFileError, match="cannot resume: the source folder:/data/pets changed") as info:
        FeatureWriter(path, source_fingerprint=changed, **meta)
    assert "splits.train.bytes: 100 in the file, 120 now" in str(info.value)
    digests = "splits.train.sizes_and_mtimes_sha256: aaaaaaaaaaaaaaaa… in the file, bbbbbbbbbbbbbbbb… now"
    assert digests in str(info.value)
    assert "--overwrite" in str(info.value)
    with FeatureWriter(path, source_fingerprint=changed, overwrite=True, **meta) as w:
        assert w.create_split("train", 10) == 0
    with FeatureFile(path) as f:
        assert f.metadata.source_fingerprint == changed


def test_a_file_without_a_fingerprint_is_not_resumed_onto_a_fingerprinted_source(tmp_path):
    path = tmp_path / "old.h5"
    with FeatureWriter(path, feature_dim=D, num_classes=K, dataset="fashion_mnist") as w:
        w.create_split("train", 10)
    with h5py.File(path, "r+") as h5:  # as written before fingerprints existed
        del h5.attrs["source_fingerprint"]
    with FeatureFile(path) as f:
        assert f.metadata.source_fingerprint == {}
    with pytest.raises(FeatureFileError, match="records no fingerprint of its source"):
        FeatureWriter(path, feature_dim=D, num_classes=K, dataset="fashion_mnist", source_fingerprint=FINGERPRINT)
    with FeatureWriter(path, feature_dim=D, num_classes=K, dataset="fashion_mnist") as w:
        assert w.create_split("train", 10) == 0


# --- 4. files in use --------------------------------------------------------------------------------------


def _hold(script: str, env: dict | None = None) -> subprocess.Popen:
    """Runs `script` in another process until it prints 'ready'; the caller kills it."""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **(env or {})})
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        pytest.fail(f"holder did not start: {line!r} {process.stderr.read()}")
    return process


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)  # what a crash leaves behind: no clean release
    process.wait()


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0"),
                    reason="HDF5 file locking is turned off in this environment")
def test_a_file_another_process_has_open_for_writing_is_reported_in_use(tmp_path):
    path = _good_file(tmp_path)
    holder = _hold(f"import h5py, time\nf = h5py.File({str(path)!r}, 'r+')\nprint('ready', flush=True)\n"
                   "time.sleep(60)", env={"HDF5_USE_FILE_LOCKING": "TRUE"})
    try:
        with pytest.raises(FileInUseError, match="in use by another process") as info:
            FeatureFile(path)
        assert "truncated or corrupt" not in str(info.value)
        result = CliRunner().invoke(app, ["info", str(path)])
        assert result.exit_code == 2 and "in use by another process" in result.output, result.output
    finally:
        _stop(holder)
    with FeatureFile(path) as f:
        assert f.split("train").num_examples == N_TRAIN


def test_a_second_writer_is_stopped_by_featdps_lock_even_without_hdf5_locking(tmp_path):
    path = tmp_path / "f.h5"
    script = f"""
import numpy as np
from featdp.featurefile import FeatureWriter
w = FeatureWriter({str(path)!r}, feature_dim={D}, num_classes={K})
w.create_split("train", 20)
w.append("train", np.ones((5, {D}), np.float32), np.zeros(5, int), np.arange(5))
print("ready", flush=True)
import time; time.sleep(60)
"""
    holder = _hold(script, env={"HDF5_USE_FILE_LOCKING": "FALSE"})
    try:
        with pytest.raises(FileInUseError, match=f"in use by another featdp process \\(pid {holder.pid} on host "):
            FeatureWriter(path, feature_dim=D, num_classes=K)
        with pytest.raises(FileInUseError, match="in use by another featdp process"):
            FeatureWriter(path, feature_dim=D, num_classes=K, overwrite=True)  # nor truncated under it
        with pytest.raises(FileInUseError, match="that is writing it"):
            FeatureFile(path)  # a reader would see a half-written file
        with pytest.raises(FileInUseError):
            write_features(path, {"train": _data(3)}, num_classes=K, overwrite=True)
    finally:
        _stop(holder)
    assert lock_path(path).exists()  # left by the killed writer, but no longer locked
    with FeatureWriter(path, feature_dim=D, num_classes=K) as w:
        assert w.create_split("train", 20) == 5
        assert lock_path(path).exists()
    assert not lock_path(path).exists()  # a clean release removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_featdps_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "f.h5"
    with FeatureFileLock(path) as lock:
        assert lock.held and lock_path(path).read_text().split()[0] == str(os.getpid())
        with pytest.raises(FileInUseError, match=f"pid {os.getpid()}"):
            FeatureFileLock(path).acquire()
        # A writer in the same process may use the lock its caller holds.
        with FeatureWriter(path, feature_dim=D, num_classes=K, lock=lock) as w:
            w.create_split("train", 0)
        assert lock.held
        with FeatureFile(path) as f:  # this process's own lock does not block its reads
            assert f.split_names == ("train",)
    assert not lock_path(path).exists()
    with FeatureFileLock(path):
        pass


def test_a_fit_whose_matrices_exceed_memory_stops_before_allocating(monkeypatch):
    """A feature dimension that fits in a small file can still ask for a d×d matrix beyond memory."""
    import featdp.training as training
    from featdp.data import ArraySource
    from featdp.featurefile import AllocationError

    monkeypatch.setattr("featdp.featurefile.available_memory", lambda: 10**6)
    source = ArraySource(np.ones((4, 600), np.float32), np.array([0, 1, 0, 1]), 2)  # d² · 8 · 4 ≈ 11.5 MB
    with pytest.raises(AllocationError, match=r"method 'dp-ls' at d = 600, K = 2 needs .* only"):
        training.fit(source, "dp-ls", epsilon=1.0, delta=1e-5, seed=0)
    with pytest.raises(AllocationError, match="method 'dp-newton'"):
        training.fit(source, "dp-newton", epsilon=1.0, delta=1e-5, seed=0, hyperparameters={"steps": 2})
