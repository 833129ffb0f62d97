"""Head and privacy report as one unit: the report carries the head's sha256 and the reader checks it, the
output directory is replaced whole, a killed writer leaves the old pair or the new one (and its leftovers are
tidied by the next run), and a second writer to the same --out is refused at once."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import invoke, write_feature_file
from featdp import report as report_lib
from featdp.report import OutputError, read_outputs


@pytest.fixture
def features(tmp_path):
    return write_feature_file(tmp_path / "features.h5")


def fit(features, out, *args):
    return invoke("fit", features, "--out", out, *args)


def leftovers(out: pathlib.Path) -> list[str]:
    """What featdp keeps beside DIR while it works: staging directories, pairs moved aside, the lock file."""
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}."))


def test_the_report_carries_the_heads_sha256_and_read_outputs_checks_it(features, tmp_path):
    out = tmp_path / "head"
    result = fit(features, out, "--method", "dp-ls", "--eps", "1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["head_sha256"] == hashlib.sha256((out / "head.npz").read_bytes()).hexdigest()
    pair = read_outputs(out)
    assert pair.report == report and pair.weights.shape == (8, 3) and pair.normalize == "unit"
    assert pair.clip_norm == 1.0 and len(pair.class_names) == 3
    assert sorted(os.listdir(out)) == ["head.npz", "privacy_report.json"]
    assert leftovers(out) == []  # no staging folder, and the lock file is gone once the run ends


def test_read_outputs_refuses_a_mismatched_pair(features, tmp_path):
    ridge, private = tmp_path / "ridge", tmp_path / "private"
    assert fit(features, ridge, "--method", "ridge").exit_code == 0
    assert fit(features, private, "--method", "dp-ls", "--eps", "1").exit_code == 0
    # The outcome of two racing fits: a non-private head beside a dp-ls report.
    (private / "head.npz").write_bytes((ridge / "head.npz").read_bytes())
    with pytest.raises(OutputError, match="mismatched pair"):
        read_outputs(private)
    report = json.loads((ridge / "privacy_report.json").read_text())
    del report["head_sha256"]
    (ridge / "privacy_report.json").write_text(json.dumps(report))
    with pytest.raises(OutputError, match="no head_sha256"):
        read_outputs(ridge)
    (ridge / "head.npz").unlink()
    with pytest.raises(OutputError, match="holds no head.npz"):
        read_outputs(ridge)
    with pytest.raises(OutputError, match="does not exist"):
        read_outputs(tmp_path / "none")


def test_an_existing_output_directory_is_replaced_whole(features, tmp_path):
    out = tmp_path / "head"
    assert fit(features, out, "--method", "ridge").exit_code == 0
    assert fit(features, out, "--method", "dp-ls", "--eps", "1").exit_code == 0
    assert read_outputs(out).report["method"] == "dp-ls"
    assert sorted(os.listdir(out)) == ["head.npz", "privacy_report.json"] and leftovers(out) == []
    # A directory holding anything else is not featdp's to replace: refused before the fit, left untouched.
    (out / "notes.txt").write_text("mine")
    result = fit(features, out, "--method", "ridge")
    assert result.exit_code == 2 and "did not write ('notes.txt')" in result.output, result.output
    assert (out / "notes.txt").read_text() == "mine" and read_outputs(out).report["method"] == "dp-ls"


def test_a_symlinked_out_is_written_where_it_points(features, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    for method in ("ridge", "logreg"):
        result = fit(features, link, "--method", method)
        assert result.exit_code == 0, result.output
    assert link.is_symlink() and read_outputs(link).report["method"] == "logreg"
    assert leftovers(target) == [] and leftovers(link) == []


def test_missing_parents_are_created_and_removed_again_on_failure(features, tmp_path):
    out = tmp_path / "a" / "b" / "head"
    result = fit(features, out, "--method", "dp-ls", "--eps", "0")
    assert result.exit_code == 2 and not (tmp_path / "a").exists(), result.output
    assert fit(features, out, "--method", "ridge").exit_code == 0
    assert read_outputs(out).report["method"] == "ridge" and leftovers(out) == []


# --- killed between the writes ----------------------------------------------------------------------------


def _can_exchange(tmp_path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    (a / "f").touch()
    try:
        return report_lib._exchange(a, b) and (b / "f").exists()
    finally:
        for d in (a, b):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()


KILLED_FIT = textwrap.dedent("""
    import os, sys
    from featdp import report
    step, exchange = sys.argv[1], sys.argv[2] == "1"
    report._between_steps = lambda at: os._exit(9) if at == step else None
    if not exchange:
        report._exchange = lambda a, b: False  # a file system that cannot swap two directories
    from featdp_cli.main import app
    app(sys.argv[3:])
""")


def _run(script, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=pathlib.Path(__file__).parent, **kwargs)


@pytest.mark.parametrize(
    "step, exchange, survivor",
    [
        ("staged", True, "ridge"),  # new pair complete beside DIR, not yet swapped in
        ("swapped", True, "dp-ls"),  # swapped in; the old pair not yet removed
        ("staged", False, "ridge"),
        ("moved-aside", False, "ridge"),  # no swap: the old DIR renamed aside, the new one not yet in
    ],
)
def test_a_fit_killed_between_its_writes_leaves_the_old_pair_or_the_new(features, tmp_path, step, exchange,
                                                                         survivor):
    if exchange and not _can_exchange(tmp_path):
        pytest.skip("this file system cannot swap two directories (renameat2 RENAME_EXCHANGE)")
    out = tmp_path / "head"
    assert fit(features, out, "--method", "ridge").exit_code == 0
    old = read_outputs(out)
    killed = _run(KILLED_FIT, step, int(exchange), "fit", features, "--method", "dp-ls", "--eps", "1",
                  "--out", out)
    output, _ = killed.communicate(timeout=300)
    assert killed.returncode == 9, output  # killed by the injected hook at `step`
    assert leftovers(out), "the kill should have left a staging folder or the lock file"
    if step == "moved-aside":
        assert not out.exists()  # the one window without DIR, only where directories cannot be swapped
    else:
        pair = read_outputs(out)  # a consistent pair: the head is the one its report describes
        assert pair.report["method"] == survivor
        if survivor == "ridge":
            assert pair.report == old.report and (pair.weights == old.weights).all()
    # The next run into DIR, even one that then fails, puts back an old pair moved aside and tidies up.
    result = fit(features, out, "--method", "dp-ls", "--eps", "1", "--test-split", "nope")
    assert result.exit_code == 2 and "nope" in result.output, result.output
    assert read_outputs(out).report["method"] == survivor and leftovers(out) == []
    result = fit(features, out, "--method", "dp-fc", "--eps", "1")
    assert result.exit_code == 0, result.output
    assert read_outputs(out).report["method"] == "dp-fc" and leftovers(out) == []


def test_a_failing_write_leaves_the_old_pair_and_no_staging_folder(features, tmp_path, monkeypatch):
    out = tmp_path / "head"
    assert fit(features, out, "--method", "ridge").exit_code == 0

    def fail(step):
        if step == "staged":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_lib, "_between_steps", fail)
    result = fit(features, out, "--method", "dp-ls", "--eps", "1")
    assert result.exit_code == 2 and "no space left on device" in result.output, result.output
    assert read_outputs(out).report["method"] == "ridge" and leftovers(out) == []


# --- concurrent writers -----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once_before_any_work(features, tmp_path, monkeypatch):
    import featdp.jobs
    import featdp.selection

    out = tmp_path / "head"
    with report_lib.output_directory(out):  # another featdp writer holds DIR
        monkeypatch.setattr(featdp.jobs, "fit", _must_not_run)
        monkeypatch.setattr(featdp.selection, "select", _must_not_run)
        for args in (["fit", features, "--method", "ridge"], ["tune", features, "--method", "dp-ls", "--eps", "1"]):
            result = invoke(*args, "--out", out)
            assert result.exit_code == 2, result.output
            assert "in use by another featdp process" in result.output and f"(pid {os.getpid()})" in result.output
        monkeypatch.undo()
    assert not out.exists() and leftovers(out) == []
    assert fit(features, out, "--method", "ridge").exit_code == 0


def _must_not_run(*args, **kwargs):
    raise AssertionError("the work started although --out is in use")


PAUSED_FIT = textwrap.dedent("""
    import os, pathlib, sys, time
    from featdp import report
    signal, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])

    def pause(step):
        if step == "staged":
            signal.touch()
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    report._between_steps = pause
    from featdp_cli.main import app
    app(sys.argv[3:])
""")


def test_two_concurrent_fits_into_one_out_never_pair_a_head_with_another_report(features, tmp_path):
    out, staged, gate = tmp_path / "head", tmp_path / "staged", tmp_path / "gate"
    first = _run(PAUSED_FIT, staged, gate, "fit", features, "--method", "ridge", "--out", out)
    try:
        deadline = time.monotonic() + 120
        while not staged.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert staged.exists(), first.communicate()[0]
        # The first fit holds DIR between writing its pair and swapping it in: the second is refused.
        second = invoke("fit", features, "--method", "dp-ls", "--eps", "1", "--out", out)
        assert second.exit_code == 2 and "in use by another featdp process" in second.output, second.output
    finally:
        gate.touch()
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    pair = read_outputs(out)
    assert pair.report["method"] == "ridge" and pair.report["private"] is False and leftovers(out) == []
