"""Many processes (featdp.distributed): sharded extraction and its manifest (featdp.featurefile_parts), the
distributed fit, and the bad inputs of a process group.

The multi-process tests start 2–3 Python processes on localhost, joined through a free port (gloo CPU
collectives); each keeps its data tiny, so the whole file runs in a few minutes on two cores (about four
on a busy 2-core machine, half of that in the four tests that extract with several processes).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from featdp import distributed
from featdp import featurefile_parts as parts
from featdp.featurefile import FeatureFile, FeatureFileError, write_features

from test_extract import BACKBONE, make_folder

CLI = [sys.executable, "-c", "from featdp_cli.main import app; app()"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "FEATDP_PROGRESS_SECONDS": "0", "PYTHONUNBUFFERED": "1"}  # progress lines arrive as printed
TIMEOUT = 240  # seconds for one multi-process run: far above what they take, far below a hang


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def group_flags(port: int, count: int, index: int) -> list[str]:
    return ["--coordinator", f"localhost:{port}", "--num-processes", str(count), "--process-id", str(index),
            "--coordinator-timeout", "60"]


def run_all(commands: list[list[str]], timeout: float = TIMEOUT) -> list[subprocess.CompletedProcess]:
    """Runs the commands at once (one per process) and waits for all."""
    started = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
               for c in commands]
    done = []
    for process in started:
        out, err = process.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(process.args, process.returncode, out, _quiet(err)))
    return done


def _quiet(stderr: str) -> str:
    """stderr without gloo's and XLA's own log lines."""
    return "\n".join(line for line in stderr.splitlines()
                     if not line.startswith(("[Gloo]", "W1", "I1", "E1", "W0", "I0")))


def blobs(n, d=16, k=4, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d))
    y = rng.integers(0, k, size=n)
    return (means[y] + 0.7 * rng.normal(size=(n, d))).astype(np.float32), y


# --- row ownership ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 7, 64])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_row_ranges_cover_every_row_exactly_once(count, align):
    for n in [0, 1, 5, 63, 64, 65, 1000, 1001]:
        ranges = [distributed.row_range(n, i, count, align) for i in range(count)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % align == 0 or start == n for start, _ in ranges)
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= align


# --- the sharded layout, read in one process ------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path):
    """The same splits as a whole file and as 3 parts with 7-row digest chunks (many chunk edges)."""
    x, y = blobs(103)
    xt, yt = blobs(20, seed=1)
    splits = {"train": (x, y), "test": (xt, yt)}
    whole = write_features(tmp_path / "whole.h5", splits, num_classes=4)
    manifest = parts.write_parts(tmp_path / "sharded.h5", splits, 3, num_classes=4, chunk_rows=7)
    return whole, manifest


def test_a_sharded_file_reads_like_the_whole_file(sharded):
    whole, manifest = sharded
    with FeatureFile(whole) as a, FeatureFile(manifest) as b:
        assert b.sharded and not a.sharded and sorted(b.split_names) == sorted(a.split_names)
        for name in a.split_names:
            one, many = a.split(name), b.split(name)
            np.testing.assert_array_equal(one.read()[0], many.read()[0])
            np.testing.assert_array_equal(one.read()[1], many.read()[1])
            np.testing.assert_array_equal(one.read_index(), many.read_index())
            for block_rows in (5, 64):
                for (xa, ya), (xb, yb) in zip(one.blocks(block_rows), many.blocks(block_rows), strict=True):
                    np.testing.assert_array_equal(xa, xb)
                    np.testing.assert_array_equal(ya, yb)
        # A row range crossing part and chunk edges, as one process of a fit reads it.
        rows = b.split("train").rows(30, 80)
        got = np.concatenate([x for x, _ in rows.blocks(9)])
        np.testing.assert_array_equal(got, a.split("train").read()[0][30:80])
    parts.verify_parts(manifest)


def _replace_part(manifest, index, source):
    shutil.copyfile(source, parts.part_path(manifest, index, 3))


def test_a_missing_truncated_or_foreign_part_is_refused_at_open_naming_it(sharded, tmp_path):
    whole, manifest = sharded
    part = parts.part_path(manifest, 1, 3)
    backup = tmp_path / "backup.h5"
    shutil.copyfile(part, backup)

    part.unlink()
    with pytest.raises(FeatureFileError, match="part part-00001-of-00003.h5 is missing"):
        FeatureFile(manifest)

    other = parts.write_parts(tmp_path / "other.h5", {"train": blobs(103), "test": blobs(20, seed=1)}, 3,
                              num_classes=4, chunk_rows=7)
    _replace_part(manifest, 1, parts.part_path(other, 1, 3))
    with pytest.raises(FeatureFileError, match="part part-00001-of-00003.h5 is from another run"):
        FeatureFile(manifest)

    _replace_part(manifest, 1, backup)
    with open(part, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(FeatureFileError, match="part part-00001-of-00003.h5 has .* bytes, the manifest records"):
        FeatureFile(manifest)


def test_an_altered_part_is_refused_before_any_of_its_rows_is_used(sharded):
    _, manifest = sharded
    with h5py.File(parts.part_path(manifest, 2, 3), "r+") as h5:  # same size, one value changed
        h5["train/features"][10, 3] += 1.0
    with FeatureFile(manifest) as features:  # sizes and metadata still agree: the content is checked lazily
        train = features.split("train")
        list(train.rows(0, 60).blocks(16))  # rows of parts 0 and 1 only
        with pytest.raises(FeatureFileError, match=r"part part-00002-of-00003.h5, split 'train', rows \[7, 14\)"):
            list(train.blocks(16))
    with pytest.raises(FeatureFileError, match="part-00002-of-00003.h5 has SHA-256"):
        parts.verify_parts(manifest)


def test_a_manifest_cannot_name_a_file_outside_its_parts_folder(sharded, tmp_path):
    whole, manifest = sharded
    with h5py.File(manifest, "r+") as h5:
        text = json.loads(h5["manifest"][()])
        text["parts"][0]["file"] = "../whole.h5"
        del h5["manifest"]
        h5.create_dataset("manifest", data=json.dumps(text), dtype=h5py.string_dtype("utf-8"))
    with pytest.raises(FeatureFileError, match=r"manifest part 0 is '../whole.h5', expected 'part-00000-of-00003.h5'"):
        FeatureFile(manifest)


def test_a_part_that_is_itself_a_manifest_is_refused(sharded, tmp_path):
    _, manifest = sharded
    other = parts.write_parts(tmp_path / "other.h5", {"train": blobs(103), "test": blobs(20, seed=1)}, 3,
                              num_classes=4, chunk_rows=7)
    _replace_part(manifest, 0, other)  # a manifest where a part belongs, with its own parts folder beside it
    shutil.copytree(parts.parts_dir(other), parts.parts_dir(parts.part_path(manifest, 0, 3)))
    with pytest.raises(FeatureFileError, match="part part-00000-of-00003.h5 is itself a manifest"):
        FeatureFile(manifest)


def test_digest_chunks_declared_by_the_manifest_are_checked_against_the_memory_before_reading(sharded, monkeypatch):
    import featdp.featurefile as featurefile

    _, manifest = sharded
    with h5py.File(manifest, "r+") as h5:  # one chunk per part: checking a digest reads the whole part slice
        text = json.loads(h5["manifest"][()])
        for layout in text["splits"].values():
            layout["chunk_rows"] = 10**12
            for piece in layout["parts"]:
                piece["digests"] = ["0" * 64] * (1 if piece["num_rows"] else 0)
        del h5["manifest"]
        h5.create_dataset("manifest", data=json.dumps(text), dtype=h5py.string_dtype("utf-8"))
    monkeypatch.setattr(featurefile, "_CHECKED_READ_BYTES", 0)
    monkeypatch.setattr(featurefile, "available_memory", lambda: 4000)  # a 16-row block fits, a 35-row part not
    with FeatureFile(manifest) as features:
        with pytest.raises(featurefile.AllocationError, match=r"chunk_rows 1000000000000 in the manifest"):
            list(features.split("train").blocks(16))


def test_one_process_does_not_extract_onto_a_sharded_file(sharded):
    from featdp.featurefile import FeatureWriter

    _, manifest = sharded
    with pytest.raises(FeatureFileError, match="is a sharded feature file"):
        FeatureWriter(manifest, feature_dim=16, num_classes=4)


# --- many processes: extraction --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "data", per_class=(9, 4))


def _extract(images, out, *more):
    return [*CLI, "extract", "--backbone", BACKBONE, "--dataset", f"folder:{images}", "--out", str(out),
            "--batch-size", "4", "--workers", "1", *more]


def _read_all(path):
    with FeatureFile(path) as features:
        return {name: (*features.split(name).read(), features.split(name).read_index())
                for name in features.split_names}


def test_a_3_process_extraction_has_the_content_of_a_1_process_one(images, tmp_path):
    port = free_port()
    results = run_all([_extract(images, tmp_path / "many.h5", *group_flags(port, 3, i)) for i in range(3)])
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
    single = subprocess.run(_extract(images, tmp_path / "one.h5"), capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr
    one, many = _read_all(tmp_path / "one.h5"), _read_all(tmp_path / "many.h5")
    assert one.keys() == many.keys()
    for name in one:
        for a, b in zip(one[name], many[name]):
            np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in parts.parts_dir(tmp_path / "many.h5").iterdir() if p.suffix == ".h5") == [
        parts.part_name(i, 3) for i in range(3)]
    # A re-run finds every part complete and rewrites the same manifest's parts: nothing to do.
    port = free_port()
    again = run_all([_extract(images, tmp_path / "many.h5", *group_flags(port, 3, i)) for i in range(3)])
    assert [r.returncode for r in again] == [0, 0, 0], [r.stderr for r in again]
    for name, arrays in _read_all(tmp_path / "many.h5").items():
        for a, b in zip(one[name], arrays):
            np.testing.assert_array_equal(a, b)


def _kill_in_the_middle_of_train(process) -> int:
    """Reads `process`'s progress lines ("[0:01] train 40/225 (…)") and SIGKILLs it at the first one with
    0 < done < total, in the middle of its train rows; returns its number of train rows (total)."""
    for line in process.stdout:
        words = line.split()
        if len(words) >= 3 and words[1] == "train" and "/" in words[2]:
            done, total = map(int, words[2].split("/"))
            if 0 < done < total:
                process.send_signal(signal.SIGKILL)
                return total
    raise AssertionError(f"no progress line before the end (exit code {process.wait()})")


def test_a_killed_process_stops_the_others_with_a_message_and_the_extraction_resumes(tmp_path):
    images = make_folder(tmp_path / "data", per_class=(150, 2))
    out = tmp_path / "many.h5"
    port = free_port()
    commands = [_extract(images, out, "--batch-size", "2", *group_flags(port, 2, i)) for i in range(2)]
    survivor = subprocess.Popen(commands[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    victim = subprocess.Popen(commands[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    total = _kill_in_the_middle_of_train(victim)
    victim.wait(timeout=TIMEOUT)
    assert victim.returncode == -signal.SIGKILL
    out_text, err = survivor.communicate(timeout=TIMEOUT)
    assert survivor.returncode == 2, (out_text, err)
    message = [line for line in _quiet(err).splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "lost contact with the other processes" in message[0], err
    assert not out.exists()  # no manifest: nothing half-written
    with FeatureFile(parts.part_path(out, 1, 2)) as part:  # the killed part kept what it had written
        assert 0 < part.split("train", require_complete=False).rows_done < total

    port = free_port()
    commands = [_extract(images, out, "--batch-size", "2", *group_flags(port, 2, i)) for i in range(2)]
    resumed = run_all(commands)
    assert [r.returncode for r in resumed] == [0, 0], [r.stderr for r in resumed]
    assert "already complete" in resumed[0].stdout  # process 0 had finished its part before
    single = subprocess.run(_extract(images, tmp_path / "one.h5"), capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr
    one, many = _read_all(tmp_path / "one.h5"), _read_all(out)
    for name in one:
        for a, b in zip(one[name], many[name]):
            np.testing.assert_array_equal(a, b)


def _fatal_log_lines(stderr: str) -> list[str]:
    """What JAX's own fatal ending prints: absl FATAL lines, C++ stack traces, Python tracebacks."""
    return [line for line in stderr.splitlines() if re.match(r"F\d{4} ", line) or "Check failure" in line
            or "Terminating process" in line or line.lstrip().startswith("@ 0x") or "Traceback" in line]


def test_a_killed_process_0_stops_the_others_with_one_error_line_and_the_extraction_resumes(tmp_path):
    """Process 0 hosts JAX's coordination service: when it dies, JAX ends every other process with a fatal
    error; each process's supervisor (featdp_cli.supervise) turns that into one `error:` line and exit 2."""
    images = make_folder(tmp_path / "data", per_class=(150, 2))
    out = tmp_path / "many.h5"
    port = free_port()
    commands = [_extract(images, out, "--batch-size", "2", *group_flags(port, 3, i)) for i in range(3)]
    victim = subprocess.Popen(commands[0], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    survivors = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                 for c in commands[1:]]
    total = _kill_in_the_middle_of_train(victim)
    victim.wait(timeout=TIMEOUT)
    assert victim.returncode == -signal.SIGKILL
    for index, survivor in enumerate(survivors, start=1):
        _, err = survivor.communicate(timeout=TIMEOUT)
        assert survivor.returncode == 2, err
        message = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(message) == 1, err
        assert message[0].startswith(f"error: process 0 (the coordinator at localhost:{port}) stopped responding"), err
        assert f"process {index} of 3 stopped; rerun the same command on every host to resume" in message[0]
        assert not _fatal_log_lines(err), err
        report = pathlib.Path(re.search(r"\(JAX's report: (.+)\)$", message[0]).group(1))
        assert "Terminating process because the JAX distributed service" in report.read_text()
        report.unlink()
    # How soon the survivors stop is bounded by communicate(timeout=...) above, not asserted as a wall-clock
    # figure here: a loaded CI machine must not fail the test.
    assert not out.exists()  # no manifest: nothing half-written
    with FeatureFile(parts.part_path(out, 0, 3)) as part:  # process 0's part kept what it had written
        assert 0 < part.split("train", require_complete=False).rows_done < total

    resumed = run_all(commands)  # the same commands, on the same port
    assert [r.returncode for r in resumed] == [0, 0, 0], [r.stderr for r in resumed]
    single = subprocess.run(_extract(images, tmp_path / "one.h5"), capture_output=True, text=True, env=ENV)
    assert single.returncode == 0, single.stderr
    one, many = _read_all(tmp_path / "one.h5"), _read_all(out)
    assert one.keys() == many.keys()
    for name in one:
        for a, b in zip(one[name], many[name]):
            np.testing.assert_array_equal(a, b)


def test_a_part_from_another_run_is_refused_by_extraction_and_by_fit(images, tmp_path):
    out, other = tmp_path / "many.h5", tmp_path / "other.h5"
    for path, limit in ((out, "13"), (other, "12")):
        port = free_port()
        done = run_all([_extract(images, path, "--limit", limit, *group_flags(port, 2, i)) for i in range(2)])
        assert [r.returncode for r in done] == [0, 0], [r.stderr for r in done]
    shutil.copyfile(parts.part_path(other, 1, 2), parts.part_path(out, 1, 2))

    fit = subprocess.run([*CLI, "fit", str(out), "--method", "dp-ls", "--eps", "1", "--out", str(tmp_path / "h")],
                         capture_output=True, text=True, env=ENV)
    assert fit.returncode == 2 and "part part-00001-of-00002.h5 is from another run" in fit.stderr, fit.stderr
    assert "Traceback" not in fit.stderr and not (tmp_path / "h").exists()

    port = free_port()
    again = run_all([_extract(images, out, "--limit", "13", *group_flags(port, 2, i)) for i in range(2)])
    assert [r.returncode for r in again] == [2, 2]
    assert "belong to different extraction runs" in again[0].stderr and "part-00001-of-00002.h5" in again[0].stderr
    assert "process 0 of 2 failed: " in again[1].stderr


# --- many processes: fit ------------------------------------------------------------------------------------------

FIT_WORKER = textwrap.dedent("""
    import hashlib, json, sys
    import numpy as np
    from featdp import distributed
    from featdp.jobs import fit_feature_file
    path, method, options, seed, port, count, index, out, result = sys.argv[1:10]
    seed = None if seed == "none" else int(seed)
    with distributed.connect(f"localhost:{port}", int(count), int(index), job={"method": method}, timeout=60) as group:
        job = fit_feature_file(path, method, epsilon=2.0, delta=1e-5, seed=seed, hyperparameters=json.loads(options),
                               processes=group, block_rows=16, out_dir=None if out == "-" else out)
    np.savez(result, weights=job.result.weights, report=json.dumps({
        "epsilon": job.report["epsilon"], "count": job.result.count.value, "n": job.result.num_examples,
        "accuracy": job.test_accuracy, "hyperparameters": job.report["hyperparameters"]}))
""")


def _fit(path, method, options, seed, count, out="-"):
    """(head, summary) of every process of a fit of `count` processes (one: no process group)."""
    port, results = free_port(), pathlib.Path(path).parent / f"fit-{os.getpid()}-{time.monotonic_ns()}"
    commands = [[sys.executable, "-c", FIT_WORKER, str(path), method, json.dumps(options), str(seed), str(port),
                 str(count), str(i), str(out), f"{results}-{i}.npz"] for i in range(count)]
    for process in run_all(commands):
        assert process.returncode == 0, process.stderr
    loaded = [np.load(f"{results}-{i}.npz") for i in range(count)]
    return [(result["weights"], json.loads(str(result["report"]))) for result in loaded]


@pytest.fixture(scope="module")
def fit_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    splits = {"train": blobs(300), "test": blobs(60, seed=1)}
    return write_features(root / "whole.h5", splits, num_classes=4), parts.write_parts(
        root / "sharded.h5", splits, 3, num_classes=4)


@pytest.mark.parametrize("method, options, exact", [
    ("dp-ls", {}, True),
    ("dp-sgd", {"steps": 4, "batch_size": 60, "lr": 2.0}, False),
    # Hyperparameters chosen from the budget: every process resolves them from the same summed ñ.
    ("dp-sgd", {"recipe": "auto"}, False),
    # Centring: the mean's sum is summed over the processes before its one release, like every statistic.
    ("dp-ls", {"center": 0.05}, True),
])
def test_a_3_process_fit_gives_the_1_process_head(fit_files, method, options, exact):
    """Same seed, same head. DP-LS's one pass sums row blocks that are the same on either side (each process's
    rows start at a block edge), so only the float64 order of the final sums differs (~1e-16 relative), which
    the release's grid rounding absorbs: the heads are equal bitwise. A Poisson-sampled DP-SGD step's
    clipped-gradient sum is computed from float32 products whose rounding depends on how rows are batched, so
    a coordinate near a half-grid point may round to the neighbouring grid point: the heads agree to within
    a few grid steps of the releases, far below their noise."""
    whole, sharded = fit_files
    (single, single_report), = _fit(whole, method, options, 11, 1)
    many = _fit(sharded, method, options, 11, 3)
    for weights, report in many:
        # The same ε, released count, n, test accuracy and hyperparameters (as resolved) on every process.
        assert report == single_report
        np.testing.assert_array_equal(weights, many[0][0])  # every process holds the same head
    if exact:
        np.testing.assert_array_equal(many[0][0], single)
    else:
        np.testing.assert_allclose(many[0][0], single, rtol=0, atol=1e-3 * np.abs(single).max())


def test_an_unseeded_fit_draws_one_key_for_all_processes_and_process_0_writes(fit_files, tmp_path):
    _, sharded = fit_files
    runs = _fit(sharded, "dp-ls", {}, "none", 2, out=tmp_path / "head")
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(np.load(tmp_path / "head" / "head.npz")["weights"], runs[0][0])
    other = _fit(sharded, "dp-ls", {}, "none", 2)
    assert not np.array_equal(other[0][0], runs[0][0])  # fresh OS randomness on each run


def test_every_process_prints_the_same_epsilon(fit_files, tmp_path):
    _, sharded = fit_files
    port = free_port()
    results = run_all([[*CLI, "fit", str(sharded), "--method", "dp-sgd", "--eps", "1.5", "--seed", "3",
                        "--out", str(tmp_path / "heads"), *group_flags(port, 2, i)] for i in range(2)])
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    lines = [[line for line in r.stdout.splitlines() if "epsilon" in line or "test top-1" in line] for r in results]
    assert lines[0] == lines[1] and len(lines[0]) == 2
    assert (tmp_path / "heads" / "privacy_report.json").exists()


def test_a_slurm_environment_supplies_the_process_group(fit_files, tmp_path):
    """No flags: JAX's Slurm detection gives the coordinator (the step's first node), the count and the id."""
    _, sharded = fit_files
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
             "JAX_COORDINATOR_PORT": str(free_port())}
    command = [*CLI, "fit", str(sharded), "--method", "dp-ls", "--eps", "1", "--seed", "1",
               "--out", str(tmp_path / "h")]
    started = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**ENV, **slurm, "SLURM_PROCID": str(i)}) for i in range(2)]
    outputs = [process.communicate(timeout=TIMEOUT) for process in started]
    assert [p.returncode for p in started] == [0, 0], [_quiet(err) for _, err in outputs]
    epsilons = [[line for line in out.splitlines() if "epsilon" in line] for out, _ in outputs]
    assert epsilons[0] == epsilons[1] and epsilons[0]


# --- bad input ----------------------------------------------------------------------------------------------------


def test_an_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path):
    started = time.monotonic()
    result = subprocess.run([*CLI, "fit", str(tmp_path / "f.h5"), "--eps", "1", "--coordinator",
                             f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "1",
                             "--coordinator-timeout", "2"], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert result.returncode == 2 and time.monotonic() - started < 60
    assert result.stderr.startswith("error: cannot reach the coordinator localhost:"), result.stderr
    assert "within 2 s" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["--num-processes", "2", "--process-id", "2"], "--process-id must lie in [0, 2), got 2"),
    (["--num-processes", "0"], "--num-processes must be >= 1, got 0"),
    (["--num-processes", "2"], "needs all of --coordinator HOST:PORT"),
    (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
])
def test_bad_process_group_flags_are_named(tmp_path, flags, fragment):
    result = subprocess.run([*CLI, "fit", str(tmp_path / "f.h5"), "--eps", "1", *flags], capture_output=True,
                            text=True, env=ENV, timeout=TIMEOUT)
    assert result.returncode == 2 and result.stderr.startswith("error:") and fragment in result.stderr, result.stderr


def test_processes_started_with_different_num_processes_are_told_so(images, tmp_path):
    port = free_port()
    results = run_all([
        _extract(images, tmp_path / "f.h5", *group_flags(port, 2, 0)),
        _extract(images, tmp_path / "f.h5", *group_flags(port, 3, 1)),
    ])
    assert [r.returncode for r in results] == [2, 2]
    for result in results:
        assert result.stderr.startswith("error: process 1 was started with --num-processes 3, process 0 with "
                                        "--num-processes 2"), result.stderr
    assert not (tmp_path / "f.h5").exists() and not parts.parts_dir(tmp_path / "f.h5").exists()


def test_processes_running_different_commands_are_told_which_option_differs(images, tmp_path):
    port = free_port()
    results = run_all([
        _extract(images, tmp_path / "f.h5", "--limit", "5", *group_flags(port, 2, 0)),
        _extract(images, tmp_path / "f.h5", "--limit", "6", *group_flags(port, 2, 1)),
    ])
    assert [r.returncode for r in results] == [2, 2]
    assert all("differ in limit" in r.stderr for r in results), [r.stderr for r in results]


# --- the supervisor of each process (featdp_cli.supervise) ----------------------------------------------------

# What JAX's client prints when the coordination service is gone (jaxlib 0.10), then SIGABRT.
JAX_FATAL = (
    "E1130 03:11:03.047153    7838 coordination_service_agent.cc:289] Polled an error from coordination service "
    "(this can be an error from this or another task).\n"
    "F1130 03:11:03.048029    7838 client.h:80] Terminating process because the JAX distributed service detected "
    "fatal errors. This most likely indicates that another task died; see the other task logs for more details. "
    "absl::Status: {status}. Check earlier logs from 1) this task, 2) the leader (usually slice 0 task 0), and 3) "
    "cluster scheduler to debug further.\n"
    "Additional GRPC error information from remote target coordination_service while calling "
    "/xla.coordination.CoordinationService/PollForError:\n"
    ':UNKNOWN:Error received from peer  {{grpc_status:14, grpc_message:"Socket closed"}}\n'
    "*** Check failure stack trace: ***\n"
    "    @     0x7fbf5a640634  absl::lts_20260107::log_internal::LogMessage::SendToLog()\n"
)
UNAVAILABLE = ("UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was "
               "preempted/died/restarted unexpectedly or this task is experiencing network issues")
NORMAL = ("[Gloo] Rank 1 is connected to 1 peer ranks\n"
          "W1130 03:11:01.000000    7838 coordination_service.cc:185] a warning, not fatal\n"
          "  its second line\n")


def _fake_child(stderr: str | list[str], end: str, sink: pathlib.Path | None = None) -> list[str]:
    """A child that writes `stderr` (each of its pieces at once) and then ends with `end` (Python code); with
    `sink`, it writes each piece only once all it wrote before has come through the supervisor into `sink`
    (or a minute has passed)."""
    pieces = [stderr] if isinstance(stderr, str) else stderr
    code = textwrap.dedent(f"""
        import os, pathlib, sys, time
        sys.stdout.write('out\\n'); sys.stdout.flush()
        sink, written = {str(sink or '')!r}, ''
        for piece in {pieces!r}:
            deadline = time.monotonic() + 60
            while sink and pathlib.Path(sink).read_text() != written and time.monotonic() < deadline:
                time.sleep(0.01)
            sys.stderr.write(piece); sys.stderr.flush()
            written += piece
        {end}
    """)
    return [sys.executable, "-c", code]


def _supervise(tmp_path, stderr: str | list[str], end: str, process_id: int = 1, in_turn: bool = False,
               **options):
    """Runs `_fake_child` under the supervisor (with `in_turn`, each piece of `stderr` after the ones before
    it have come through); returns the outcome and what came through."""
    from featdp_cli import supervise

    path = tmp_path / f"stderr-{time.monotonic_ns()}"
    with open(path, "wb") as sink:
        outcome = supervise.run(_fake_child(stderr, end, path if in_turn else None), coordinator="host-a:1234",
                                process_id=process_id, num_processes=2, stderr_fd=sink.fileno(), **options)
    return outcome, path.read_text()


HELD = "error: process 1 of 2 lost contact with the other processes (gloo): ...\n"
LATE = "W1130 03:11:03.000000    7838 preemption_sync_manager.cc:147] Failed: UNAVAILABLE\n  more\n"


def test_a_child_ended_by_jax_for_an_unreachable_coordinator_is_one_line_naming_process_0(tmp_path):
    """The log lines just before JAX's fatal line (its "Polled an error", written with it) and the child's
    own error line (a broken collective seen first) go to the report with it; the lines that came through
    before pass (the child writes the rest once they have: no wall-clock margin)."""
    held, late = HELD, LATE
    outcome, stderr = _supervise(tmp_path, [NORMAL, held + late + JAX_FATAL.format(status=UNAVAILABLE)],
                                 "os.abort()", in_turn=True, hold_s=0.2)
    assert outcome.returncode == -signal.SIGABRT
    assert outcome.message == (
        "process 0 (the coordinator at host-a:1234) stopped responding (UNAVAILABLE: Failed to send RPC to "
        "coordination service), so process 1 of 2 stopped; rerun the same command on every host to resume "
        f"(JAX's report: {outcome.report})")
    assert stderr == NORMAL  # the lines before the fatal report pass; it and the child's own error line do not
    report = pathlib.Path(outcome.report).read_text()
    assert report == held + late + JAX_FATAL.format(status=UNAVAILABLE)
    pathlib.Path(outcome.report).unlink()


@pytest.mark.parametrize("fatal_after, idle_at, held_back", [
    (0.2, None, True),
    (0.999, 0.5, True),  # the idle supervisor's release at 0.5 finds nothing held long enough
    (1.0, None, False),
    (1.5, None, False),  # a supervisor that stalled: the lines come late, the fatal one's time releases first
    (1.5, 1.2, False),  # released while idle
    (60.0, None, False),
])
def test_absl_lines_are_held_for_the_hold_time_from_when_they_were_read(tmp_path, fatal_after, idle_at, held_back):
    """The sieve driven with explicit read times, so that no scheduling delay can change what it does: the
    absl lines (NORMAL's warning and its second line) read less than `hold_s` before JAX's fatal report go
    into it; read `hold_s` or more before, they pass, whether or not the supervisor released them while
    it waited."""
    from featdp_cli import supervise

    rest = HELD + LATE + JAX_FATAL.format(status=UNAVAILABLE)
    path = tmp_path / "stderr"
    with open(path, "wb") as sink:
        sieve = supervise._Sieve(sink.fileno(), hold_s=1.0)
        for line in NORMAL.splitlines(keepends=True):
            sieve.feed(line.encode(), 100.0)
        if idle_at is not None:
            sieve.release(100.0 + idle_at)
        for line in rest.splitlines(keepends=True):
            sieve.feed(line.encode(), 100.0 + fatal_after)
        outcome = sieve.close(-signal.SIGABRT, "host-a:1234", 1, 2)
    warning = NORMAL.split("\n", 1)[1]
    assert path.read_text() == (NORMAL.removesuffix(warning) if held_back else NORMAL)
    assert outcome.message.startswith("process 0 (the coordinator at host-a:1234) stopped responding"), outcome
    assert pathlib.Path(outcome.report).read_text() == (warning if held_back else "") + rest
    pathlib.Path(outcome.report).unlink()


@pytest.mark.parametrize("process_id, status, expected", [
    (1, "INTERNAL: this task was marked unhealthy",
     "JAX's coordination service (process 0, at host-a:1234) ended process 1 of 2: INTERNAL: this task was "
     "marked unhealthy"),
    (0, UNAVAILABLE, "JAX's coordination service (process 0, at host-a:1234) ended process 0 of 2: UNAVAILABLE: "
                     "Failed to send RPC to coordination service"),
    (1, "DEADLINE_EXCEEDED: heartbeat timeout", "process 0 (the coordinator at host-a:1234) stopped responding "
                                                "(DEADLINE_EXCEEDED: heartbeat timeout), so process 1 of 2 stopped"),
])
def test_other_fatal_endings_by_jax_name_their_status(tmp_path, process_id, status, expected):
    outcome, stderr = _supervise(tmp_path, JAX_FATAL.format(status=status), "os._exit(1)", process_id)
    assert outcome.returncode == 1 and outcome.message.startswith(expected + "; rerun the same command"), outcome
    assert stderr == ""
    pathlib.Path(outcome.report).unlink()


@pytest.mark.parametrize("stderr, end, returncode", [
    (NORMAL, "sys.exit(0)", 0),
    (NORMAL + "error: a bad value\n", "sys.exit(3)", 3),
    # A fatal error that is not JAX's distributed runtime's: passed through, the signal too.
    ("F1130 03:11:03.048029    7838 other.cc:1] Check failed: x\n*** Check failure stack trace: ***\n",
     "os.abort()", -signal.SIGABRT),
    # JAX's fatal line, but a child that nonetheless ended well: nothing to report.
    (JAX_FATAL.format(status=UNAVAILABLE), "sys.exit(0)", 0),
])
def test_every_other_ending_passes_through_unchanged(tmp_path, stderr, end, returncode):
    outcome, passed = _supervise(tmp_path, stderr, end)
    assert outcome.returncode == returncode and outcome.message is None
    assert passed == stderr


SUPERVISOR = textwrap.dedent("""
    import sys
    from featdp_cli import supervise
    child = ("import os, sys, time\\nfrom featdp_cli import supervise\\nsupervise.adopt()\\n"
             "print(os.getpid(), flush=True)\\ntime.sleep(120)")
    outcome = supervise.run([sys.executable, "-c", child], coordinator="h:1", process_id=1, num_processes=2)
    sys.exit(supervise.exit_like(outcome.returncode))
""")


def _gone(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


@pytest.mark.parametrize("sent, ends_with", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)])
def test_a_signal_to_the_supervisor_reaches_its_child_and_leaves_no_orphan(sent, ends_with):
    """SIGTERM is forwarded (the child dies of it, and the supervisor as it did); SIGKILL cannot be, but
    the child dies with its supervisor."""
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True, env=ENV)
    child = int(supervisor.stdout.readline())
    supervisor.send_signal(sent)
    assert supervisor.wait(timeout=30) == ends_with
    deadline = time.monotonic() + 30  # PDEATHSIG acts at once; the margin is for a loaded machine
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_a_command_given_as_a_list_of_arguments_is_not_supervised(monkeypatch, tmp_path):
    """CliRunner passes arguments, not this process's command line: re-running that would run pytest."""
    from typer.testing import CliRunner

    from featdp_cli import supervise
    from featdp_cli.main import app

    def refuse(*args, **kwargs):
        raise AssertionError("supervised")

    monkeypatch.setattr(supervise, "run", refuse)
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "f.h5"), "--eps", "1", "--coordinator",
                                      f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "1",
                                      "--coordinator-timeout", "1"])
    assert result.exit_code == 2 and "cannot reach the coordinator" in result.output, result.output
