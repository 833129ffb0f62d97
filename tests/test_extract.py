"""Stage one end to end: content, data parallelism, resuming after SIGKILL, and bad input."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featdp.extraction.backbones.registry import load_backbone
from featdp.extraction.datasets import open_dataset
from featdp.extraction.extract import ExtractConfig, extract
from featdp.featurefile import FeatureFile
from featdp_cli.main import app

pytest.importorskip("kymatio")
BACKBONE = "scatternet"  # weight-free and fast on a CPU


def make_folder(root: pathlib.Path, per_class=(30, 10), classes=("ant", "bee", "cat"), seed=0):
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "test"), per_class):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = int(rng.integers(20, 40))
                pixels = (rng.random((size, size + c)) * 255).astype(np.uint8)
                image = Image.fromarray(pixels) if i % 2 else Image.fromarray(np.stack([pixels] * 3, -1))
                image.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "data")


def read_all(path):
    with FeatureFile(path) as handle:
        return {name: (*handle.split(name).read(), handle.split(name).read_index()) for name in handle.split_names}


def test_extract_writes_what_the_backbone_computes(folder, tmp_path):
    out = extract(ExtractConfig(backbone=BACKBONE, dataset=f"folder:{folder}", out=tmp_path / "f.h5", batch_size=7,
                               workers=1))
    content = read_all(out)
    dataset = open_dataset(f"folder:{folder}")
    backbone = load_backbone(BACKBONE)
    assert set(content) == {"train", "test"}
    for split, (features, labels, index) in content.items():
        n = dataset.splits[split]
        np.testing.assert_array_equal(index, np.arange(n))
        examples = [dataset.example(split, i) for i in range(n)]
        np.testing.assert_array_equal(labels, [label for _, label in examples])
        expected = np.asarray(jax.jit(backbone.apply)({}, np.stack([backbone.prepare(im) for im, _ in examples])))
        # float16 storage: compare at its precision.
        np.testing.assert_allclose(features, expected, rtol=2e-3, atol=2e-3)
    with FeatureFile(out) as handle:
        meta = handle.metadata
    assert meta.backbone == BACKBONE and meta.class_names == ("ant", "bee", "cat")
    assert meta.preprocessing["compute_dtype"] == "float32" and meta.feature_dim == 3969


def test_data_parallel_over_eight_cpu_devices_matches_one_device(folder, tmp_path):
    single = extract(ExtractConfig(backbone=BACKBONE, dataset=f"folder:{folder}", out=tmp_path / "one.h5",
                                   batch_size=16, store_dtype="float32", workers=1))
    script = (
        "import jax, pathlib, sys; assert jax.local_device_count() == 8, jax.local_devices();"
        "from featdp.extraction.extract import ExtractConfig, extract;"
        f"extract(ExtractConfig(backbone='{BACKBONE}', dataset='folder:{folder}', out=pathlib.Path(sys.argv[1]),"
        "batch_size=12, store_dtype='float32', workers=1))"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "eight.h5")], env=env, check=True)
    one, eight = read_all(single), read_all(tmp_path / "eight.h5")
    for split in one:
        np.testing.assert_allclose(eight[split][0], one[split][0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(eight[split][1], one[split][1])


def _command(folder, out):
    return [sys.executable, "-c", "from featdp_cli.main import app; app()", "extract", "--backbone", BACKBONE,
            "--dataset", f"folder:{folder}", "--out", str(out), "--batch-size", "4", "--workers", "2"]  # processes


def _children(pid: int) -> list[int]:
    children = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _run_and_kill_after(command, split, rows):
    """Starts the command, SIGKILLs it once it reports `rows` rows of `split` done (or lets it finish).
    Returns its exit code and the loader processes it had started."""
    # A progress line at every batch ("[0:01] train 8/96 (12 img/s)"), not one per 15 s.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "FEATDP_PROGRESS_SECONDS": "0"})
    children = []
    for line in process.stdout:
        done = re.search(rf"\] {split} (\d+)/", line)
        if done and int(done.group(1)) >= rows:
            children = _children(process.pid)
            process.send_signal(signal.SIGKILL)
            break
    process.wait()
    return process.returncode, children


def _gone_within(pids, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(pathlib.Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.2)
    return False


def test_sigkill_at_any_point_then_rerun_gives_the_uninterrupted_file(folder, tmp_path):
    reference = tmp_path / "reference.h5"
    finished = subprocess.run(_command(folder, reference), capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "leaked shared_memory" not in finished.stderr  # loader batches are unlinked, none left in /dev/shm
    expected = read_all(reference)
    for split, rows in [("train", 4), ("train", 48), ("test", 0), ("test", 24)]:
        out = tmp_path / f"killed_{split}_{rows}.h5"
        code, loaders = _run_and_kill_after(_command(folder, out), split, rows)
        assert code == -signal.SIGKILL, f"the run finished before the kill at {split}:{rows}"
        assert _gone_within(loaders), "loader processes outlived the killed run"
        result = CliRunner().invoke(app, ["fit", str(out), "--eps", "1", "--train-split", split])
        assert result.exit_code != 0 and "incomplete" in result.output  # readers refuse unfinished splits
        assert subprocess.run(_command(folder, out), capture_output=True).returncode == 0
        resumed = read_all(out)
        for name, (features, labels, index) in expected.items():
            np.testing.assert_array_equal(resumed[name][2], index)  # no row missing, none twice
            np.testing.assert_array_equal(resumed[name][1], labels)
            np.testing.assert_array_equal(resumed[name][0], features)


def test_batches_freed_only_at_exit_leave_no_shared_memory_behind(folder, tmp_path):
    # Keeping every batch alive until interpreter exit is the worst case of a late free (grain's own deleter
    # then never runs: 31 segments were reported leaked before batches were unlinked on arrival).
    script = (
        "import pathlib, sys; import featdp.extraction.extract as ex; kept = []; pad = ex._pad\n"
        "ex._pad = lambda images, size: kept.append(images) or pad(images, size)\n"
        "if __name__ == '__main__':\n"
        f"    ex.extract(ex.ExtractConfig(backbone='{BACKBONE}', dataset='folder:{folder}',"
        " out=pathlib.Path(sys.argv[1]), batch_size=4, workers=2))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.h5")], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert "leaked shared_memory" not in finished.stderr


def test_a_different_command_is_refused_unless_overwrite(folder, tmp_path):
    out = tmp_path / "f.h5"
    runner = CliRunner()
    base = ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}", "--out", str(out), "--workers", "1"]
    assert runner.invoke(app, base + ["--limit", "5"]).exit_code == 0
    refused = runner.invoke(app, base + ["--limit", "6"])
    assert refused.exit_code != 0 and "error:" in refused.output
    assert runner.invoke(app, base + ["--limit", "6", "--overwrite"]).exit_code == 0
    assert read_all(out)["train"][0].shape[0] == 6


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--backbone", "resnet-9000"], "unknown backbone 'resnet-9000'"),
        (["--dataset", "tfds:no_such_dataset_xyz"], "no_such_dataset_xyz"),
        (["--dataset", "folder:/nonexistent/images"], "/nonexistent/images"),
        (["--splits", "validation"], "validation"),
        (["--batch-size", "0"], "batch size"),
        (["--out", "/nonexistent/dir/f.h5"], "/nonexistent/dir"),
        (["--backbone", "efficientnet-lite0", "--checkpoint", "/nonexistent/w.pth"], "/nonexistent/w.pth"),
    ],
)
def test_bad_extract_arguments_fail_with_a_message(folder, tmp_path, args, fragment):
    defaults = {"--backbone": BACKBONE, "--dataset": f"folder:{folder}", "--out": str(tmp_path / "f.h5"),
                "--workers": "1"}
    for flag in args[::2]:
        defaults.pop(flag, None)
    argv = ["extract", *[x for kv in defaults.items() for x in kv], *args]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code != 0 and "error:" in result.output, result.output
    assert fragment in result.output, result.output


def test_a_pinned_checkpoint_sha256_is_checked_before_extraction(tmp_path):
    import hashlib

    from featdp.extraction.backbones import efficientnet_lite_weights

    weights = efficientnet_lite_weights.checkpoint_path("lite0")
    digest = hashlib.sha256(pathlib.Path(weights).read_bytes()).hexdigest()
    root = make_folder(tmp_path / "data", per_class=(2, 1))
    base = ["extract", "--backbone", "efficientnet-lite0", "--dataset", f"folder:{root}", "--workers", "1",
            "--limit", "1", "--checkpoint", str(weights)]
    wrong = "0" * 64
    result = CliRunner().invoke(app, base + ["--out", str(tmp_path / "bad.h5"), "--checkpoint-sha256", wrong])
    assert result.exit_code != 0 and wrong in result.output and digest in result.output, result.output
    assert not (tmp_path / "bad.h5").exists()
    result = CliRunner().invoke(app, base + ["--out", str(tmp_path / "typo.h5"), "--checkpoint-sha256", "abc"])
    assert result.exit_code != 0 and "64 hex digits" in result.output, result.output
    result = CliRunner().invoke(app, base + ["--out", str(tmp_path / "ok.h5"), "--checkpoint-sha256", digest.upper()])
    assert result.exit_code == 0, result.output
    with FeatureFile(tmp_path / "ok.h5") as handle:
        assert handle.metadata.checkpoint_sha256 == digest
    # A weight-free backbone has no file to pin.
    result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{root}", "--workers",
                                      "1", "--out", str(tmp_path / "free.h5"), "--checkpoint-sha256", digest])
    assert result.exit_code != 0 and "weight-free" in result.output, result.output


def test_a_corrupt_image_is_fatal_and_named(tmp_path):
    root = make_folder(tmp_path / "data", per_class=(3, 1))
    bad = root / "train" / "bee" / "001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{root}",
                                      "--out", str(tmp_path / "f.h5"), "--workers", "2"])
    assert result.exit_code != 0 and "001.png" in result.output, result.output


def test_resuming_onto_replaced_images_is_refused_unless_overwrite(tmp_path):
    root = make_folder(tmp_path / "data", per_class=(2, 1))
    out = tmp_path / "f.h5"
    command = ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{root}", "--out", str(out), "--workers", "1",
               "--splits", "train", "--limit", "3"]
    assert CliRunner().invoke(app, command).exit_code == 0
    with FeatureFile(out) as handle:
        assert handle.metadata.source_fingerprint["splits"]["train"]["files"] == 6
    # Replace the images, as a new download or a re-export would: same names, other pixels.
    rng = np.random.default_rng(1)
    for path in sorted(root.glob("*/*/*.png")):
        Image.fromarray((rng.random((25, 31)) * 255).astype(np.uint8)).save(path)
        os.utime(path, ns=(10**18, 10**18))
    for extra in ([], ["--splits", "train,test", "--limit", "3"]):  # finishing the file, or adding a split
        result = CliRunner().invoke(app, command + extra)
        assert result.exit_code == 2 and "error:" in result.output, result.output
        assert f"the source folder:{root} changed" in result.output and "splits.train." in result.output
        assert "--overwrite" in result.output
    result = CliRunner().invoke(app, command + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "f.h5.lock").exists()


def test_a_batch_size_beyond_memory_stops_before_allocating(folder, tmp_path):
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}", "--out",
                                      str(out), "--workers", "1", "--batch-size", "1000000000"])
    assert result.exit_code == 2 and "error:" in result.output, result.output
    assert "--batch-size 1000000000: a batch of 1000000000 images" in result.output
    assert "TiB" in result.output and "is available" in result.output
    assert list(tmp_path.iterdir()) == []  # no file, no lock file


def test_a_second_extraction_onto_the_same_file_stops_at_once(folder, tmp_path):
    from featdp.featurefile import FeatureFileLock

    out = tmp_path / "f.h5"
    with FeatureFileLock(out):  # as a running extraction holds it
        result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}",
                                          "--out", str(out), "--workers", "1"])
        assert result.exit_code == 2, result.output
        assert f"in use by another featdp process (pid {os.getpid()}" in result.output
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []
