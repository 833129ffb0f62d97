"""The `featdp` command: the happy path, and every kind of bad input failing cleanly with no output left."""

from __future__ import annotations

import json
import os
import pathlib

import h5py
import numpy as np
import pytest

from conftest import invoke, write_feature_file
from featdp.featurefile import write_features


@pytest.fixture
def features(tmp_path):
    return write_feature_file(tmp_path / "features.h5")


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

    from featdp.extraction.datasets import idx

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
    assert {"dp-sgd (Tramèr–Boneh recipe)", "dp-sgd (recipe=auto)", "logreg (non-private)"} <= set(rows)
    # Each row is printed as soon as its fits are done, before the table that gathers them.
    lines = result.output.splitlines()
    table_starts = next(i for i, line in enumerate(lines) if "Fashion-MNIST test top-1" in line)
    early = [line.split()[0] for line in lines[:table_starts] if line.startswith("    ") and "fit " in line]
    assert early == [*method_names(private=True), "dp-sgd", "dp-sgd", "logreg", "ridge"], result.output
    # The recipe's command is one line, pasteable as it is.
    assert any("`featdp fit --method dp-sgd --set clip_norm=63 --set steps=293 --set batch_size=5 --set "
               "grad_clip=0.1 --set lr=16 --set momentum=0.9`" in line for line in lines), result.output
    reports = sorted(p.parent.name for p in out.glob("*/privacy_report.json"))
    assert "dp-sgd-recipe_eps2" in reports and "dp-newton_eps0.5" in reports
    report = json.loads((out / "dp-sgd-recipe_eps2" / "privacy_report.json").read_text())
    assert report["hyperparameters"]["steps"] == 293 and report["epsilon"] <= 2
    # The recipe keeps T&B's rate q = 8192/60000 at the public size (here --limit 40).
    assert report["hyperparameters"]["batch_size"] == round(40 * 8192 / 60000)
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


def test_demo_with_two_backbones_extracts_each_then_fits_on_their_combination(tmp_path, monkeypatch):
    from featdp.demo import Demo
    from featdp.featurefile import FeatureFile

    fitted_on = []
    monkeypatch.setattr(Demo, "rows", lambda self: fitted_on.append(self.features) or iter(()))
    data = _fashion_mnist_idx(tmp_path / "fm", n_train=24, n_test=12)
    out = tmp_path / "runs"
    result = invoke("demo", "--backbone", "scatternet+efficientnet-lite0", "--data-dir", data, "--out", out,
                    "--limit", 12, "--eps", 1)
    assert result.exit_code == 0, result.output
    combined = out / "fashion_mnist_scatternet+efficientnet-lite0_first12.h5"
    assert fitted_on == [combined] and f"combined into {combined}" in result.output
    assert result.output.count("extracting Fashion-MNIST") == 2
    with FeatureFile(combined) as joined:
        assert joined.metadata.feature_dim == 3969 + 1280
        assert joined.metadata.backbone == "scatternet+efficientnet-lite0"
        assert joined.split("train").num_examples == 12


# --- untrusted input, crashes: every failure an `error:` line with exit code 2, none after the work ----------


def _must_not_run(*args, **kwargs):
    raise AssertionError("the fit started although it was bound to fail")


@pytest.fixture
def no_fit(monkeypatch):
    """The fit and the selection fail the test if reached: a bad --out or argument must stop before them."""
    import featdp.jobs
    import featdp.selection

    monkeypatch.setattr(featdp.jobs, "fit", _must_not_run)
    monkeypatch.setattr(featdp.selection, "select", _must_not_run)


def _unusable_out(tmp_path, kind):
    if kind == "an existing file":
        (tmp_path / "taken").write_text("x")
        return tmp_path / "taken", "exists and is not a directory"
    if kind == "under a file":
        (tmp_path / "file").write_text("x")
        return tmp_path / "file" / "sub" / "out", "is not a directory"
    if kind == "read-only directory":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked / "out", "permission denied"
    if not os.path.isdir("/sys") or os.path.exists("/sys/featdp-test"):
        pytest.skip("no sysfs")
    return pathlib.Path("/sys/featdp-test/out"), "cannot create /sys/featdp-test"  # refused even to root


@pytest.mark.parametrize("command", ["fit", "tune"])
@pytest.mark.parametrize("kind", ["an existing file", "under a file", "read-only directory", "sysfs"])
def test_an_unusable_out_is_an_error_line_before_the_work(features, tmp_path, no_fit, command, kind):
    out, fragment = _unusable_out(tmp_path, kind)
    method = ["--method", "dp-ls", "--eps", "1"]
    result = invoke(command, features, *method, "--out", out)
    assert result.exit_code == 2 and "error:" in result.output and fragment in result.output, result.output
    assert not result.exception or isinstance(result.exception, SystemExit)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "command, args, fragment",
    [
        ("fit", ["--method", "dp-ls", "--set", "clip_norm=inf"], "clip_norm must be a finite number, got inf"),
        ("fit", ["--method", "dp-sgd", "--set", "lr=inf"], "lr must be a finite number, got inf"),
        ("fit", ["--method", "dp-fc", "--set", "lr=-inf"], "lr must be a finite number"),
        ("fit", ["--method", "dp-ls", "--set", "lam=nan"], "lam must be a finite number, got nan"),
        ("fit", ["--method", "dp-newton", "--set", "hessian_share=inf"], "hessian_share must be a finite number"),
        ("tune", ["--method", "dp-sgd", "--grid", "lr=1,inf"], "lr must be a finite number, got inf"),
    ],
)
def test_an_infinite_hyperparameter_is_refused_before_the_fit(features, tmp_path, no_fit, command, args, fragment):
    result = invoke(command, features, "--eps", "1", *args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_every_float_hyperparameter_of_every_method_must_be_finite():
    import dataclasses

    from featdp.methods import HyperparameterError, get_method, registry

    for name, cls in registry().items():
        for field in dataclasses.fields(cls):
            if "float" in str(field.type):
                for bad in (float("inf"), float("-inf"), float("nan")):
                    with pytest.raises(HyperparameterError, match=f"{field.name} must be a finite number"):
                        get_method(name, **{field.name: bad})


@pytest.mark.parametrize("seed", [2**63, 2**64 + 1, 10**40, -(2**70)])
def test_a_seed_of_any_size_works_and_reproduces(features, tmp_path, seed):
    heads = []
    for run in ("a", "b"):
        result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--seed", seed, "--out", tmp_path / run)
        assert result.exit_code == 0, result.output
        heads.append(np.load(tmp_path / run / "head.npz")["weights"])
    assert np.array_equal(*heads)
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--seed", seed + 1, "--out", tmp_path / "c")
    assert result.exit_code == 0 and not np.array_equal(heads[0], np.load(tmp_path / "c" / "head.npz")["weights"])
    result = invoke("tune", features, "--method", "dp-ls", "--eps", "1", "--mean-runs", "2", "--seed", seed,
                    "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "t" / "privacy_report.json").read_text())["noise_seeded"] is True


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda h: h.attrs.__setitem__("feature_dim", "six"), "'feature_dim' must be an integer, got 'six'"),
        (lambda h: h.attrs.__setitem__("num_classes", 3.0), "'num_classes' must be an integer, got 3.0"),
        (lambda h: h.attrs.__setitem__("class_names", 7), "'class_names' must be a string, got 7"),
        (lambda h: h["train"].attrs.__setitem__("complete", "yes"), "'complete' must be a boolean, got 'yes'"),
        (lambda h: h["test"].attrs.__setitem__("rows_done", 1.5), "'rows_done' must be an integer, got 1.5"),
    ],
)
def test_an_attribute_of_the_wrong_type_is_an_error_line_through_fit(features, tmp_path, edit, fragment):
    _edit(features, edit)
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "error:" in result.output and fragment in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_user_text_is_printed_verbatim_not_as_markup(features, tmp_path, monkeypatch):
    # [/x] crashed rich's markup parser (a traceback, exit 1); [nan] and [bold] vanished from the message.
    result = invoke("fit", features, "--method", "[/x]", "--eps", "1", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "unknown method '[/x]'" in result.output, result.output
    result = invoke("fit", features, "--method", "dp-sgd", "--eps", "1", "--set", "steps=[nan]",
                    "--out", tmp_path / "o")
    assert result.exit_code == 2 and "steps='[nan]'" in result.output, result.output
    monkeypatch.chdir(tmp_path)  # a short path: the summary table is cut to the terminal's width
    result = invoke("fit", features, "--method", "ridge", "--out", "[bold]head[/x]")
    assert result.exit_code == 0 and "written     [bold]head[/x]" in result.output, result.output
    _edit(features, lambda h: h.attrs.__setitem__("backbone", "[/x] [bold]net"))
    result = invoke("info", features)
    assert result.exit_code == 0 and "[/x] [bold]net" in result.output, result.output

    import featdp.jobs
    from featdp.data import DataError

    def warn_then_fail(*args, **kwargs):
        import warnings

        warnings.warn("delta [nan] is [/x] odd")
        raise DataError("split [bold]train[/bold] is [/x] bad")

    monkeypatch.setattr(featdp.jobs, "fit_feature_file", warn_then_fail)
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--out", tmp_path / "w")
    assert result.exit_code == 2, result.output
    assert "warning: delta [nan] is [/x] odd" in result.output
    assert "error: split [bold]train[/bold] is [/x] bad" in result.output


@pytest.mark.parametrize("command", ["fit", "tune"])
def test_a_missing_test_split_is_an_error_listing_the_splits(features, tmp_path, no_fit, command):
    result = invoke(command, features, "--method", "dp-ls", "--eps", "1", "--test-split", "nope",
                    "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "no split 'nope' to test on" in result.output and "available splits: test, train" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["fit", "tune"])
def test_an_empty_test_split_fits_without_a_test_accuracy(features, tmp_path, command):
    out = tmp_path / "out"
    result = invoke(command, features, "--method", "dp-ls", "--eps", "1", "--mean-runs", "2", "--test-split", "",
                    "--out", out) if command == "tune" else invoke(
        command, features, "--method", "dp-ls", "--eps", "1", "--test-split", "", "--out", out)
    assert result.exit_code == 0 and "test top-1" not in result.output, result.output
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["test_split"] is None and report["test_accuracy"] is None


def _image_folder(root, per_class=2):
    from PIL import Image

    for c, name in enumerate(("ant", "bee")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((12, 12, 3), 40 * i + 100 * c, np.uint8)).save(root / "train" / name / f"{i}.png")
    return root


@pytest.mark.parametrize("pinned", [False, True])
def test_a_checkpoint_that_is_a_directory_is_an_error_line(tmp_path, pinned):
    root = _image_folder(tmp_path / "images")
    (tmp_path / "weights").mkdir()
    args = ["extract", "--backbone", "efficientnet-lite0", "--dataset", f"folder:{root}", "--workers", "1",
            "--checkpoint", tmp_path / "weights", "--out", tmp_path / "f.h5"]
    result = invoke(*args, *(["--checkpoint-sha256", "0" * 64] if pinned else []))
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert "is a directory, not a checkpoint file" in result.output and not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("workers", ["-1", "-3"])
def test_negative_extract_workers_are_refused(tmp_path, workers):
    root = _image_folder(tmp_path / "images")
    result = invoke("extract", "--backbone", "scatternet", "--dataset", f"folder:{root}", "--workers", workers,
                    "--out", tmp_path / "f.h5")
    assert result.exit_code == 2 and f"--workers must be ≥ 0 (0 or 1: load in this process), got {workers}" in (
        result.output), result.output
    assert not (tmp_path / "f.h5").exists()


def test_zero_extract_workers_load_in_this_process(tmp_path):
    pytest.importorskip("kymatio")
    root = _image_folder(tmp_path / "images")
    args = ["extract", "--backbone", "scatternet", "--dataset", f"folder:{root}", "--limit", "2"]
    for workers in ("0", "1"):
        result = invoke(*args, "--workers", workers, "--out", tmp_path / f"w{workers}.h5")
        assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "w0.h5") as zero, h5py.File(tmp_path / "w1.h5") as one:
        assert np.array_equal(zero["train/features"][:], one["train/features"][:])


def test_an_unknown_device_is_an_error_line(features, tmp_path):
    result = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--device", "abacus", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "error: Invalid value for '--device'" in result.output, result.output
    assert "'abacus' is not one of 'auto', 'cpu'" in result.output
    assert not (tmp_path / "o").exists()


# --- what a user sees on long or unattended work (issue 12, item 9) ---------------------------------------


def test_extract_off_a_terminal_prints_few_unwrapped_lines_and_says_when_there_is_nothing_to_do(tmp_path):
    pytest.importorskip("kymatio")
    root = _image_folder(tmp_path / "images", per_class=3)
    # A path longer than rich's default 80 columns: it must come out on one line, pasteable.
    out = tmp_path / ("a-directory-with-a-long-name-" * 3) / "features.h5"
    out.parent.mkdir()
    args = ["extract", "--backbone", "scatternet", "--dataset", f"folder:{root}", "--workers", "0",
            "--batch-size", "1", "--out", out]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # Six batches: one line for the finished split, not one per batch (time-throttled; the test is quick).
    progress = [line for line in lines if "train" in line and "/6" in line]
    assert len(progress) == 1 and "train 6/6" in progress[0] and "img/s" in progress[0], result.output
    assert f"wrote {out}" in lines, result.output
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "train: already complete (6 rows)" in again.output and f"already complete: {out} (nothing to extract)" in (
        again.output.splitlines()), again.output
    assert "img/s" not in again.output and "wrote" not in again.output


def test_info_shows_an_unfinished_split_as_rows_done_of_the_declared_total(tmp_path):
    from featdp.featurefile import FeatureWriter

    path = tmp_path / "partial.h5"
    x, y = np.ones((30, 4), np.float32), np.zeros(30, np.int64)
    with FeatureWriter(path, feature_dim=4, num_classes=2) as writer:
        writer.create_split("train", 100)
        writer.append("train", x, y, np.arange(30))
    result = invoke("info", path)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "train" in line)
    assert "30 of 100" in row and "unfinished" in row, result.output


def test_fit_says_when_it_replaces_a_previous_head_and_report(features, monkeypatch):
    monkeypatch.chdir(features.parent)
    first = invoke("fit", "--method", "dp-ls", "--eps", "1")  # the default --out, heads/dp-ls_eps1
    assert first.exit_code == 0 and "replaced" not in first.output, first.output
    again = invoke("fit", "--method", "dp-ls", "--eps", "1")
    assert again.exit_code == 0, again.output
    assert "the previous head and report in heads/dp-ls_eps1" in " ".join(again.output.split()), again.output


def _commands():
    import typer.main

    from featdp_cli.main import app

    return typer.main.get_command(app).commands


def test_every_option_of_every_command_has_help_and_no_flag_shows_a_bool_metavar():
    for name, command in _commands().items():
        for param in command.params:
            assert getattr(param, "help", None), f"featdp {name}: {param.name} has no help text"
        result = invoke(name, "--help")
        assert result.exit_code == 0 and "<bool>" not in result.output, result.output
    assert "--overwrite / --no-overwrite" in invoke("extract", "--help").output
    assert "--references / --no-references" in invoke("bench", "--help").output


@pytest.mark.parametrize("command, option, choices", [
    ("audit", "--mode", ("canary", "one-run", "white-box")),
    ("audit", "--score", None),
    ("audit", "--accountant", None),
    ("fit", "--accountant", None),
    ("fit", "--device", None),
    ("tune", "--accountant", None),
    ("bench", "--accountant", None),
    ("extract", "--dtype", None),
])
def test_choice_options_list_the_library_choices_and_refuse_others_as_one_error_line(command, option, choices):
    from featdp.accounting import ACCOUNTANTS
    from featdp.audit.canary import SCORES
    from featdp.backend import DEVICES
    from featdp.extraction.extract import DTYPES

    choices = choices or {"--score": SCORES, "--accountant": ACCOUNTANTS, "--device": DEVICES, "--dtype": DTYPES}[option]
    assert f"{option} <{'|'.join(choices)}>" in invoke(command, "--help").output
    required = {"audit": ["--method", "dp-ls", "--eps", "1"]}.get(command, [])
    result = invoke(command, *required, option, "sideways")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: Invalid value for") and "'sideways'" in errors[0], errors
    assert not result.exception or isinstance(result.exception, SystemExit)


def test_methods_lists_every_hyperparameter_with_its_meaning():
    import dataclasses

    from featdp.methods import registry

    output = " ".join(invoke("methods").output.split())
    for name, cls in registry().items():
        meanings = cls.hyperparameter_help()
        assert list(meanings) == [f.name for f in dataclasses.fields(cls)]
        for key, meaning in meanings.items():
            assert meaning, f"{name}: hyperparameter {key} has no description"
    for fragment in ("grad_clip", "C_g, the per-example gradient norm bound", "hessian_share", "(non-private)"):
        assert fragment in output, output


def test_bench_methods_keeps_the_non_private_references_unless_told_not_to(features, tmp_path):
    args = ["bench", features, "--methods", "dp-ls", "--eps", "1", "--seeds", "1", "--no-tune", "--no-private-tune"]
    result = invoke(*args, "--out", tmp_path / "with")
    assert result.exit_code == 0, result.output
    kinds = [line.split()[:2] for line in result.output.splitlines() if line.startswith("  ")]
    assert ["non-private", "ridge"] in kinds and ["non-private", "logreg"] in kinds and ["default", "dp-ls"] in kinds
    # Off a terminal the bench's progress ends with its last line: every row done.
    assert any(line.endswith("bench rows 3/3") for line in result.output.splitlines()), result.output
    result = invoke(*args, "--no-references", "--out", tmp_path / "without")
    assert result.exit_code == 0 and "non-private" not in result.output.split("# featdp bench")[0], result.output
    assert "--no-references" in (tmp_path / "without" / "features.md").read_text()


def test_tune_off_a_terminal_prints_no_progress_so_its_number_of_runs_stays_out_of_logs(features, tmp_path):
    result = invoke("tune", features, "--method", "dp-ls", "--eps", "1", "--mean-runs", "3", "--seed", "1",
                    "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert not [line for line in result.output.splitlines() if line.startswith("[")], result.output
