"""The `featdp` command: the happy path, and every kind of bad input failing cleanly with no output left."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_blobs
from featdp.featurefile import write_features
from featdp_cli.main import app

runner = CliRunner()


@pytest.fixture
def features(tmp_path):
    x, y = make_blobs(n=240, d=8, k=3)
    return write_features(
        tmp_path / "features.h5", {"train": (x[:200], y[:200]), "test": (x[200:], y[200:])}, num_classes=3,
        dtype="float16",
    )


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fit_writes_a_loadable_head_and_a_complete_report(features, tmp_path):
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "2", "--delta", "1e-6", "--seed", "4",
                    "--set", "lam=5", "--out", out)
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output
    head = np.load(out / "head.npz")
    assert head["weights"].shape == (8, 3)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["method"] == "dp-ls" and report["hyperparameters"]["lam"] == 5.0
    assert report["epsilon"] <= 2.0 and report["delta"] <= 1e-6 and report["noise_seeded"] is True
    assert report["target_delta"] == 1e-6 and report["sampler"]["epsilon_slack"] < 1e-6
    assert [r["name"] for r in report["releases"]] == ["num_examples", "gram", "class_sums"]
    assert all(r["sensitivity"] > 0 and r["noise_multiplier"] > 0 for r in report["releases"])
    assert report["dp_event"]["type"] == "ComposedDpEvent"
    assert [e["type"] for e in report["dp_event"]["events"]] == ["GaussianDpEvent", "GaussianDpEvent"]
    # n is private: the report carries only the released count, and says what was public.
    assert "num_examples" not in report and abs(report["num_examples_released"] - 200) < 100
    assert set(report["public"]) >= {"num_examples", "classes"} and all(r["grid"] > 0 for r in report["releases"])
    assert len(report["input_sha256"]) == 64
    assert report["featdp_version"] and "seed_warning" in report and 0 <= report["test_accuracy"] <= 1


def test_fit_defaults_to_features_h5_in_the_working_directory(features, monkeypatch):
    monkeypatch.chdir(features.parent)
    result = invoke("fit", "--method", "dp-fc", "--eps", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((features.parent / "heads" / "dp-fc_eps1" / "privacy_report.json").read_text())
    assert report["delta"] < 1 / 200 and report["noise_seeded"] is False


def test_large_delta_warns(features, tmp_path):
    result = invoke("fit", features, "--method", "dp-sgd", "--eps", "1", "--delta", "0.01", "--out", tmp_path / "o")
    assert result.exit_code == 0 and "not below 1/n" in result.output


def test_info_and_methods(features):
    result = invoke("info", features)
    assert result.exit_code == 0 and "feature_dim" in result.output and "train" in result.output
    result = invoke("methods")
    assert result.exit_code == 0 and "dp-fc" in result.output and "dp-newton" in result.output


def _edit(path, edit):
    with h5py.File(path, "r+") as handle:
        edit(handle)
    return path


def _nan_row(h):
    h["train/features"][5, 2] = np.nan


def _inf_row(h):
    h["train/features"][7, 0] = np.inf


def _bad_label(h):
    h["train/labels"][3] = 9


def _negative_label(h):
    h["train/labels"][3] = -1


def _dim_mismatch(h):
    del h["test/features"]
    h["test"].create_dataset("features", data=np.zeros((40, 5), np.float16))


def _unknown_version(h):
    h.attrs["format_version"] = 99


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_nan_row, "row 5"),
        (_inf_row, "row 7"),
        (_bad_label, "9"),
        (_negative_label, "-1"),
        (_dim_mismatch, "5"),
        (_unknown_version, "99"),
    ],
)
def test_bad_files_fail_cleanly(features, tmp_path, edit, fragment):
    _edit(features, edit)
    out = tmp_path / "out"
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--out", out)
    assert result.exit_code != 0
    assert "error:" in result.output and fragment in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_truncated_corrupt_and_missing_files_fail_cleanly(features, tmp_path):
    data = features.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    for path, fragment in [(truncated, "truncated"), (corrupt, "corrupt"), (tmp_path / "none.h5", "no such")]:
        out = tmp_path / "out"
        result = invoke("fit", path, "--eps", "1", "--out", out)
        assert result.exit_code != 0 and fragment in result.output, result.output
        assert not out.exists()


def test_empty_train_split_fails_cleanly(tmp_path):
    path = write_features(
        tmp_path / "empty.h5",
        {"train": (np.zeros((0, 4), np.float32), np.zeros(0, np.int32)),
         "test": (np.ones((3, 4), np.float32), np.zeros(3, np.int32))},
        num_classes=2,
    )
    result = invoke("fit", path, "--eps", "1", "--out", tmp_path / "out")
    assert result.exit_code != 0 and "empty" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--eps", "0"], "epsilon"),
        (["--eps", "-2"], "epsilon"),
        (["--eps", "nan"], "epsilon"),
        (["--eps", "1", "--delta", "0"], "delta"),
        (["--eps", "1", "--delta", "1"], "delta"),
        (["--eps", "1", "--delta", "-0.1"], "delta"),
        (["--eps", "1", "--method", "dp-magic"], "unknown method 'dp-magic'"),
        (["--eps", "1", "--set", "warp=9"], "unknown hyperparameter 'warp'"),
        (["--eps", "1", "--set", "steps=many"], "steps"),
        (["--eps", "1", "--set", "lr=-1"], "lr must be > 0"),
        (["--eps", "1", "--set", "novalue"], "KEY=VALUE"),
        (["--eps", "1", "--accountant", "moments"], "accountant"),
        ([], "epsilon is required"),
        (["--eps", "1", "--train-split", "validation"], "validation"),
    ],
)
def test_bad_arguments_fail_cleanly(features, tmp_path, args, fragment):
    out = tmp_path / "out"
    result = invoke("fit", features, *args, "--out", out)
    assert result.exit_code != 0
    assert fragment in result.output, result.output
    assert not out.exists()


def test_non_private_reference_needs_no_epsilon(features, tmp_path):
    result = invoke("fit", features, "--method", "ridge", "--out", tmp_path / "ridge")
    assert result.exit_code == 0 and "non-private" in result.output
    assert json.loads((tmp_path / "ridge" / "privacy_report.json").read_text())["private"] is False


def _fashion_mnist_idx(directory, n_train=48, n_test=24, seed=0):
    """IDX files shaped like Fashion-MNIST's: class c is a bright band at rows 2c..2c+5 plus noise."""
    import gzip

    from featdp.datasets import idx

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c: 2 * c + 6] += 180
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            (directory / f"{stem}.gz").write_bytes(gzip.compress(idx.idx_bytes(array)))
    return directory


def test_demo_runs_the_main_job_and_reuses_its_features(tmp_path):
    data = _fashion_mnist_idx(tmp_path / "fm")
    out = tmp_path / "runs"
    # Lite0 (d = 1280) keeps the per-class eigendecompositions of dp-newton quick; the default ScatterNet
    # (d = 3969) is the same code path.
    args = ["demo", "--backbone", "efficientnet-lite0", "--data-dir", data, "--out", out]
    result = invoke(*args, "--limit", 40, "--eps", "0.5,2")
    assert result.exit_code == 0, result.output
    from featdp.methods import method_names

    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    for name in method_names(private=True):
        assert name in rows and len(rows[name].split("│")) == 6, result.output  # method, 2 ε, seconds
    assert "dp-sgd (Tramèr–Boneh recipe)" in rows and "logreg (non-private)" in rows
    reports = sorted(p.parent.name for p in out.glob("*/privacy_report.json"))
    assert "dp-sgd-recipe_eps2" in reports and "dp-newton_eps0.5" in reports
    report = json.loads((out / "dp-sgd-recipe_eps2" / "privacy_report.json").read_text())
    assert report["hyperparameters"]["steps"] == 293 and report["epsilon"] <= 2
    features = out / "fashion_mnist_efficientnet-lite0_first40.h5"

    def content():
        with h5py.File(features) as f:
            return f.attrs["created_utc"], f["train/features"][:]

    created, rows = content()
    assert rows.shape == (40, 1280)
    # A different --limit gets its own file; rerunning the first reuses its features (no new extraction).
    assert invoke(*args, "--limit", 24, "--eps", 1).exit_code == 0
    assert (out / "fashion_mnist_efficientnet-lite0_first24.h5").exists()
    assert invoke(*args, "--limit", 40, "--eps", 1).exit_code == 0
    again = content()
    assert again[0] == created and np.array_equal(again[1], rows)
