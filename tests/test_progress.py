"""Progress of long work: what the library reports (`featdp.progress`) and how the CLI shows it."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from conftest import make_blobs
from featdp import progress
from featdp.data import ArraySource
from featdp.progress import Update
from featdp_cli.display import ProgressDisplay


def _recorded(work):
    updates: list[Update] = []
    with progress.reporting(updates.append):
        result = work()
    return result, updates


def _counts(updates, task):
    return [(u.done, u.total) for u in updates if u.task == task]


def test_nothing_is_reported_without_a_reporter_and_a_reporter_sees_only_its_own_block():
    updates = []
    progress.report("outside", 1, 2)
    with progress.reporting(updates.append):
        list(progress.track(range(3), "inside", 3))
        with progress.reporting(None):  # silenced, as `featdp tune` is off a terminal
            progress.report("silenced", 1, 1)
    progress.report("after", 1, 1)
    assert _counts(updates, "inside") == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert {u.task for u in updates} == {"inside"}


def test_track_ends_its_task_when_the_items_run_out_before_the_total():
    _, updates = _recorded(lambda: list(progress.track(iter("ab"), "short", 5)))
    assert updates[-1] == Update("short", 2, 2) and updates[-1].finished


def test_a_private_fit_reports_its_phases_its_statistics_pass_and_every_step():
    from featdp.training import fit

    x, y = make_blobs(n=300)
    _, updates = _recorded(lambda: fit(ArraySource(x, y, 4), "dp-fc", epsilon=1.0, delta=1e-5))
    phases = [(u.done, u.detail) for u in updates if u.task == "fit dp-fc"]
    assert phases == [(0, "reading the train split"), (1, "releasing the example count"),
                      (2, "calibrating the noise"), (3, "training"), (4, "")]
    assert _counts(updates, "statistics pass") == [(0, None), (1, 1)]
    assert _counts(updates, "dp-fc gradient steps") == [(step, 30) for step in range(31)]
    assert all(u.total == 4 for u in updates if u.task == "fit dp-fc")


@pytest.mark.parametrize("method, task, total", [("dp-sgd", "dp-sgd gradient steps", 3),
                                                 ("dp-newton", "dp-newton class solves", 4)])
def test_the_other_iterative_methods_report_their_loops(method, task, total):
    from featdp.training import fit

    x, y = make_blobs(n=200)
    hyperparameters = {"steps": 3} if method == "dp-sgd" else {}
    _, updates = _recorded(lambda: fit(ArraySource(x, y, 4), method, epsilon=1.0, delta=1e-5,
                                       hyperparameters=hyperparameters))
    assert _counts(updates, task) == [(done, total) for done in range(total + 1)]


def test_bench_reports_rows_done_of_the_rows_planned():
    from featdp.bench.runner import BenchConfig, planned_rows, run_bench

    x, y = make_blobs(n=300)
    train, test = ArraySource(x[:240], y[:240], 4), ArraySource(x[240:], y[240:], 4)
    config = BenchConfig(epsilons=(1.0, 2.0), seeds=1, methods=("dp-ls",), tune=False, private_tune=False)
    result, updates = _recorded(lambda: run_bench(train, test, config))
    counts = _counts(updates, "bench rows")
    assert planned_rows(config) == len(result.rows) == 4  # dp-ls at two ε, ridge, logreg
    assert counts == [(done, 4) for done in range(5)] + [(4, 4)]


def test_an_audit_reports_its_fits():
    from featdp.audit import canary_audit
    from featdp.methods import get_method

    _, updates = _recorded(lambda: canary_audit(get_method("dp-ls"), 1.0, 1e-5, trials=6, seed=0))
    assert _counts(updates, "audit fits") == [(done, 6) for done in range(7)]


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _plain_display(**options):
    buffer = io.StringIO()
    clock = _Clock()
    console = Console(file=buffer, force_terminal=False, width=10_000)
    return ProgressDisplay(console, clock=clock, interval=10.0, **options), clock, buffer


def test_off_a_terminal_lines_are_throttled_and_the_outermost_tasks_last_line_is_kept():
    display, clock, buffer = _plain_display()
    with display:
        for row in range(100):  # one update a second for 100 s, with an inner task that finishes each time
            clock.now = float(row)
            progress.report("bench rows", row, 100)
            progress.report("fit dp-ls", 1, 1)
        clock.now = 100.0
        progress.report("bench rows", 100, 100)
    lines = buffer.getvalue().splitlines()
    assert 9 <= len(lines) <= 11, lines  # one per 10 s, not one per update
    assert lines[-1] == "[1:40] bench rows 100/100"
    assert lines[0].startswith("[0:10] bench rows 10/100")
    assert not any("fit dp-ls" in line for line in lines)  # an inner task's end is not worth a line


def test_with_lines_off_nothing_is_printed_off_a_terminal():
    display, clock, buffer = _plain_display(lines=False)
    with display:
        for run in range(5):
            clock.now = 100.0 * run
            display(Update("runs", run, 4))
            progress.report("dp-fc gradient steps", run, 4)
    assert buffer.getvalue() == ""


def test_on_a_terminal_bars_are_transient():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    with ProgressDisplay(console) as display:
        progress.report("audit fits", 0, 3)
        progress.report("audit fits", 1, 3)
        assert [task.description for task in display._bar.tasks] == ["audit fits"]
        progress.report("audit fits", 3, 3)
        assert display._bar.tasks == []


def test_on_a_terminal_the_outermost_tasks_last_line_stays_unless_lines_are_off():
    for lines in (True, False):
        buffer = io.StringIO()
        with ProgressDisplay(Console(file=buffer, force_terminal=True, width=120), lines=lines):
            progress.report("train", 0, 8)
            progress.report("train", 8, 8, "120 img/s")
        assert ("train 8/8 (120 img/s)" in buffer.getvalue()) == lines


def test_task_names_are_shown_as_text_not_markup_on_a_terminal_and_hours_are_counted():
    buffer = io.StringIO()
    with ProgressDisplay(Console(file=buffer, force_terminal=True, width=120)) as display:
        display(Update("[bold]split[/x]", 0, 2, "[nan] img/s"))
        display(Update("[bold]split[/x]", 2, 2, "[nan] img/s"))
    assert "[bold]split[/x] 2/2 ([nan] img/s)" in buffer.getvalue()
    display, clock, buffer = _plain_display()
    with display:
        clock.now = 3 * 3600 + 62.0
        progress.report("audit fits", 5, 5)
    assert buffer.getvalue() == "[3:01:02] audit fits 5/5\n"


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("2.5", 2.5), ("soon", 15.0), ("-1", 15.0)])
def test_the_log_interval_can_be_set_from_the_environment(monkeypatch, value, seconds):
    from featdp_cli.display import log_interval

    monkeypatch.setenv("FEATDP_PROGRESS_SECONDS", value)
    assert log_interval() == seconds


def test_a_loop_left_early_ends_its_task():
    updates = []
    with progress.reporting(updates.append):
        with pytest.raises(RuntimeError):
            for step in progress.track(range(10), "steps", 10):
                if step == 3:
                    raise RuntimeError("a failed step")
    assert updates[-1] == Update("steps", 3, 3)


def test_the_statistics_pass_does_not_report_how_many_row_blocks_the_private_data_fill():
    from featdp.training import fit

    counts = []
    for n in (300, 2000):  # 1 and 4 blocks of 512 rows
        x, y = make_blobs(n=n)
        _, updates = _recorded(lambda: fit(ArraySource(x, y, 4), "dp-ls", epsilon=1.0, delta=1e-5, block_rows=512))
        counts.append(_counts(updates, "statistics pass"))
    assert counts[0] == counts[1] == [(0, None), (1, 1)]
