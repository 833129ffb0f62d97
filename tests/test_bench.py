"""`featdp bench`: the grid of rows, oracle selection on held-out rows, private selection within the budget,
recipe=auto rows, the report files, and bad input."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_blobs
from featdp.bench import report, tuning
from featdp.accounting import PrivacyParameterError
from featdp.bench.runner import (
    BenchConfig, BenchError, BenchRow, has_auto_recipe, planned_rows, private_tuning_seed, run_bench,
)
from featdp.cache import StatisticsCache
from featdp.data import ArraySource, Preprocessing, TrainingData
from featdp.featurefile import write_features
from featdp.methods import registry
from featdp_cli.main import app

K = 3


@pytest.fixture(scope="module")
def splits():
    x, y = make_blobs(n=700, d=10, k=K, seed=3)
    x.flags.writeable = False  # as `load_splits` holds them: the bench's cache relies on it
    return ArraySource(x[:500], y[:500], K), ArraySource(x[500:], y[500:], K)


@pytest.fixture(scope="module")
def bench_result(splits):
    config = BenchConfig(epsilons=(1.0, 8.0), delta=1e-4, seeds=2, methods=("dp-ls", "dp-sgd", "ridge"),
                         references=False)
    return run_bench(*splits, config)


def test_every_method_epsilon_and_seed_gets_one_row_per_kind(bench_result):
    rows = bench_result.rows
    for kind in ("default", "oracle", "private-tuned"):
        for method in ("dp-ls", "dp-sgd"):
            got = sorted((r.epsilon, r.seed) for r in rows if r.kind == kind and r.method == method)
            assert got == [(1.0, 0), (1.0, 1), (8.0, 0), (8.0, 1)]
    non_private = [r for r in rows if r.kind == "non-private"]
    assert [r.method for r in non_private] == ["ridge"] and non_private[0].epsilon is None
    assert all(0 <= r.accuracy <= 1 and r.fit_seconds >= 0 for r in rows)
    # Separable blobs: the non-private head and the private ones at ε = 8 are far above chance.
    assert non_private[0].accuracy > 0.9
    assert all(r.accuracy > 0.6 for r in rows if r.epsilon == 8.0)


def test_seeds_make_rows_reproducible_and_distinct(splits, bench_result):
    again = run_bench(*splits, BenchConfig(epsilons=(1.0,), delta=1e-4, seeds=2, methods=("dp-ls",), tune=False,
                                           private_tune=False, references=False))
    first = {(r.seed): r.accuracy for r in bench_result.rows
             if r.kind == "default" and r.method == "dp-ls" and r.epsilon == 1.0}
    assert {r.seed: r.accuracy for r in again.rows} == first
    noise = [r.noise_scale for r in again.rows]
    assert noise[0] == noise[1] > 0


def test_oracle_rows_record_the_held_out_choice(bench_result):
    tuned = [r for r in bench_result.rows if r.kind == "oracle"]
    assert all(r.validation_accuracy is not None for r in tuned if r.method != "dp-newton")
    grid = [dict(c) for c in registry()["dp-ls"].tuning_grid(450)]
    for row in tuned:
        if row.method == "dp-ls":
            assert row.hyperparameters in grid


def test_holdout_split_is_disjoint_covering_and_fixed(splits):
    train, _ = splits
    fit_part, held = tuning.split_holdout(train, 0.2)
    assert held.num_examples == 100 and fit_part.num_examples == 400
    assert not (fit_part.mask & held.mask).any() and (fit_part.mask | held.mask).all()
    assert fit_part.parent is train and held.parent is train  # masks over the rows, not copies
    rows = np.vstack([x for x, _ in fit_part.blocks()])
    np.testing.assert_array_equal(rows, train.features[fit_part.mask])
    again, _ = tuning.split_holdout(train, 0.2)
    np.testing.assert_array_equal(again.mask, fit_part.mask)


def test_choose_picks_the_best_held_out_candidate(splits):
    fit_part, held = tuning.split_holdout(splits[0], 0.2)
    choice = tuning.choose("dp-ls", fit_part, held, 2.0, 1e-4)
    scores = [accuracy for _, accuracy in choice.candidates]
    assert choice.validation_accuracy == max(scores)
    assert len(choice.candidates) == len(registry()["dp-ls"].tuning_grid(fit_part.num_examples))


def test_the_gram_pass_is_computed_once_and_read_only(splits):
    from featdp import stats

    train, _ = splits
    cache = StatisticsCache()
    first = stats.second_moments(TrainingData(train, Preprocessing(), cache=cache))
    assert stats.second_moments(TrainingData(train, Preprocessing(), cache=cache))[0] is first[0]
    with pytest.raises(ValueError):
        first[0][0, 0] = 1.0
    # Without a cache, every fit computes its own.
    assert stats.second_moments(TrainingData(train, Preprocessing()))[0] is not first[0]


def test_report_files(bench_result, tmp_path):
    paths = report.write_all(bench_result, tmp_path, "blobs", "blobs", "featdp bench blobs.h5")
    assert sorted(p.name for p in paths) == ["blobs.csv", "blobs.json", "blobs.md", "blobs.png"]
    text = (tmp_path / "blobs.md").read_text()
    assert "featdp bench blobs.h5" in text and "**not** counted" in text
    for kind, method in (("default", "dp-ls"), ("private-tuned", "dp-sgd"), ("oracle selection (not private)", "dp-sgd"),
                         ("non-private", "ridge")):
        assert f"| {kind} | {method} |" in text
    assert "| tuned |" not in text and "| oracle |" not in text  # the markdown never calls oracle rows "tuned"
    assert "**oracle selection (not private)**" in text and "RepeatAndSelectDpEvent" in text
    # Each method's rows side by side: default, auto, private-tuned, oracle.
    table = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines() if "| dp-sgd |" in line]
    assert table == ["default", "recipe=auto (epochs from ñ·ε)", "private-tuned", "oracle selection (not private)"]
    records = list(csv.DictReader(io.StringIO((tmp_path / "blobs.csv").read_text())))
    assert len(records) == len(bench_result.rows)
    assert {r["kind"] for r in records} == {"default", "auto", "private-tuned", "oracle", "non-private"}
    assert json.loads((tmp_path / "blobs.json").read_text())["num_train"] == 500
    assert (tmp_path / "blobs.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob("*.partial*"))


def test_summary_is_median_and_std_over_seeds(bench_result):
    table = report.summarize(bench_result.rows)
    cell = table[("default", "dp-ls")][1.0]
    values = [r.accuracy for r in bench_result.rows if r.kind == "default" and r.method == "dp-ls" and r.epsilon == 1.0]
    assert cell.count == 2 and cell.median == pytest.approx(np.median(values))
    assert cell.std == pytest.approx(np.std(values, ddof=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"epsilons": (1.0, 0.0)}, "epsilon must be a finite number > 0, got 0.0"),
    ({"seeds": 0}, "seeds must be ≥ 1"),
    ({"methods": ("dp-nope",)}, "unknown method 'dp-nope'"),
    ({"delta": 1.5}, "delta must lie in the open interval (0, 1), got 1.5"),
])
def test_bad_configs_name_the_value(kwargs, message):
    with pytest.raises((BenchError, PrivacyParameterError), match=message.replace("(", r"\(").replace(")", r"\)")):
        BenchConfig(**kwargs)


def _feature_file(tmp_path):
    x, y = make_blobs(n=300, d=6, k=K, seed=1)
    return write_features(tmp_path / "f.h5", {"train": (x[:240], y[:240]), "test": (x[240:], y[240:])},
                          num_classes=K)


def test_cli_bench_writes_tables_and_plot(tmp_path):
    path = _feature_file(tmp_path)
    result = CliRunner().invoke(app, ["bench", str(path), "--eps", "1,4", "--seeds", "2", "--methods",
                                      "dp-ls,dp-fc,ridge", "--no-tune", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f.csv", "f.json", "f.md", "f.png"]
    assert "--no-tune" in (tmp_path / "out" / "f.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--eps", "1,-2"], "epsilon must be a finite number > 0, got -2.0"),
    (["--eps", "one"], "--eps and --peer-eps expect comma-separated numbers"),
    (["--methods", "nope"], "unknown method 'nope'"),
    (["--peers", "nope"], "unknown peer 'nope'"),
])
def test_cli_bench_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    path = _feature_file(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["bench", str(path), "--seeds", "1", "--no-tune", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_a_single_candidate_grid_reuses_the_default_fits(splits):
    result = run_bench(*splits, BenchConfig(epsilons=(2.0,), delta=1e-4, seeds=2, methods=("dp-newton",)))
    default = [r for r in result.rows if r.kind == "default"]
    tuned = [r for r in result.rows if r.kind == "oracle"]
    assert [(r.seed, r.accuracy, r.fit_seconds) for r in tuned] == [(r.seed, r.accuracy, r.fit_seconds) for r in default]
    assert all(r.validation_accuracy is None for r in tuned)
    # Nothing to select: no private-tuned row, and the table says why.
    assert not [r for r in result.rows if r.kind == "private-tuned"]
    assert "No private-tuned row for dp-newton" in report.markdown(result, "t", "cmd")


def test_json_round_trip_renders_the_same_table(bench_result):
    text = report.to_json(bench_result, "cmd")
    again = report.from_json(text)
    assert report.markdown(again, "t", "cmd") == report.markdown(bench_result, "t", "cmd")


def test_tuned_candidates_are_rebuilt_for_the_full_train_split(splits):
    fit_part, held = tuning.split_holdout(splits[0], 0.2)
    choice = tuning.choose("dp-sgd", fit_part, held, 8.0, 1e-4)
    full = tuning.for_examples("dp-sgd", choice, splits[0].num_examples)
    expected = registry()["dp-sgd"].tuning_grid(splits[0].num_examples)[choice.index]
    assert full.hyperparameters() == registry()["dp-sgd"].create(**expected).hyperparameters()
    recipe = registry()["dp-sgd"].tuning_grid(60000)[1]
    assert recipe["batch_size"] == 8192  # the paper's q = 8192/60000 on the full split


def test_reused_decompositions_change_no_result(splits, bench_result, monkeypatch):
    """The bench decomposes each distinct released matrix once; every row equals a fit without the cache."""
    from featdp import linalg

    calls = []
    real = linalg._eigh
    monkeypatch.setattr(linalg, "_eigh", lambda m: calls.append(1) or real(m))
    config = BenchConfig(epsilons=(1.0, 8.0), delta=1e-4, seeds=2, methods=("dp-ls",), private_tune=False)
    cached = run_bench(*splits, config)
    with_cache = len(calls)
    calls.clear()
    uncached = run_bench(*splits, config, cache=StatisticsCache(max_bytes=0))  # keeps nothing
    assert [(r.kind, r.epsilon, r.seed, r.accuracy) for r in cached.rows] == \
        [(r.kind, r.epsilon, r.seed, r.accuracy) for r in uncached.rows]
    # Per ε: 2 default fits + one shared release for all λ candidates; tuned fits reuse the defaults'.
    assert with_cache == 2 * (2 + 1) < len(calls)


# ------------------------------------------------------------------------------------ private-tuned rows


def _private(rows):
    return [r for r in rows if r.kind == "private-tuned"]


def test_private_tuned_rows_spend_at_most_the_target(bench_result):
    rows = _private(bench_result.rows)
    assert len(rows) == 2 * 2 * 2  # dp-ls and dp-sgd (ridge is not private) × 2 ε × 2 seeds
    for row in rows:
        assert row.epsilon_spent <= row.epsilon and row.delta_spent <= row.delta == 1e-4
        assert row.epsilon_spent > 0.99 * row.epsilon  # the selection uses its budget, not a fraction of it
        assert row.mean_runs == len(registry()[row.method].tuning_grid(1000))
        assert 0 <= row.validation_accuracy <= 1 and row.noise_scale > 0
    for row in bench_result.rows:  # default and oracle rows state theirs too
        if row.kind in ("default", "oracle"):
            assert row.epsilon_spent <= row.epsilon


def test_private_tuned_rows_are_featdp_selection_seeded_per_row(splits, bench_result):
    from featdp import selection

    train, test = splits
    row = next(r for r in _private(bench_result.rows) if (r.method, r.epsilon, r.seed) == ("dp-sgd", 1.0, 1))
    chosen = selection.select(train, ["dp-sgd"], epsilon=1.0, delta=1e-4, mean_runs=row.mean_runs,
                              seed=private_tuning_seed("dp-sgd", 1.0, 1))
    assert float(np.mean(chosen.predict(test.features) == test.labels)) == row.accuracy
    assert chosen.privacy.epsilon == row.epsilon_spent
    # Every row draws its own K, candidates and noise.
    seeds = {private_tuning_seed(m, e, s) for m in ("dp-ls", "dp-sgd") for e in (1.0, 8.0) for s in (0, 1)}
    assert len(seeds) == 8 and private_tuning_seed("dp-ls", 1.0, 0) == private_tuning_seed("dp-ls", 1, 0)


def test_private_tuned_rows_reproduce_with_the_seed(splits, bench_result):
    config = BenchConfig(epsilons=(8.0,), delta=1e-4, seeds=2, methods=("dp-ls",), tune=False, references=False)
    again = run_bench(*splits, config)
    assert {r.kind for r in again.rows} == {"default", "private-tuned"}

    def key(rows):
        return [(r.seed, r.accuracy, r.hyperparameters, r.validation_accuracy, r.epsilon_spent)
                for r in _private(rows) if r.method == "dp-ls" and r.epsilon == 8.0]

    assert key(again.rows) == key(bench_result.rows) and len(key(again.rows)) == 2


def test_mean_runs_is_a_public_setting(splits):
    config = BenchConfig(epsilons=(4.0,), delta=1e-4, seeds=1, methods=("dp-ls",), tune=False, mean_runs=2,
                         references=False)
    rows = _private(run_bench(*splits, config).rows)
    assert [r.mean_runs for r in rows] == [2.0] and rows[0].epsilon_spent <= 4.0
    off = run_bench(*splits, BenchConfig(epsilons=(4.0,), delta=1e-4, seeds=1, methods=("dp-ls",), tune=False,
                                         private_tune=False, references=False))
    assert {r.kind for r in off.rows} == {"default"}
    for bad in (0.5, float("nan"), True):
        with pytest.raises(BenchError, match="mean number of runs must be a finite number >= 1"):
            BenchConfig(mean_runs=bad)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the accountants' searches at a tiny ε
def test_a_budget_too_small_to_tune_is_reported_not_fatal(splits):
    result = run_bench(*splits, BenchConfig(epsilons=(1e-3,), delta=1e-4, seeds=1, methods=("dp-ls",), tune=False,
                                            references=False))
    assert [r.kind for r in result.rows] == ["default"]
    assert "too small to tune" in result.skipped["dp-ls private-tuned at ε = 0.001"]


def test_old_json_tuned_rows_read_back_as_oracle(bench_result):
    record = json.loads(report.to_json(bench_result, "cmd"))
    del record["config"]["private_tune"], record["config"]["mean_runs"], record["config"]["auto"]
    record["rows"] = [{k: v for k, v in row.items() if k in ("kind", "method", "epsilon", "delta", "seed", "accuracy",
                                                          "fit_seconds", "hyperparameters", "noise_scale",
                                                          "validation_accuracy")}
                      | {"kind": "tuned" if row["kind"] == "oracle" else row["kind"]}
                      for row in record["rows"] if row["kind"] not in ("private-tuned", "auto")]
    old = report.from_json(json.dumps(record))
    assert {r.kind for r in old.rows} == {"default", "oracle", "non-private"} and not old.config.auto
    text = report.markdown(old, "t", "cmd")
    assert "| oracle selection (not private) | dp-ls |" in text and "private-tuned" not in text
    assert "recipe=auto" not in text
    assert isinstance(old.rows[0], BenchRow)


def test_cli_bench_private_tuning_options(tmp_path):
    path = _feature_file(tmp_path)
    result = CliRunner().invoke(app, ["bench", str(path), "--eps", "4", "--seeds", "1", "--methods", "dp-ls",
                                      "--no-references", "--no-tune", "--mean-runs", "2",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "f.md").read_text()
    assert "--mean-runs 2" in text and "| private-tuned | dp-ls |" in text and "dp-ls R = 2" in text
    rows = json.loads((tmp_path / "out" / "f.json").read_text())["rows"]
    assert sorted(r["kind"] for r in rows) == ["default", "private-tuned"]
    bad = CliRunner().invoke(app, ["bench", str(path), "--eps", "4", "--seeds", "1", "--mean-runs", "0.5",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "mean number of runs" in bad.output and not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- auto rows


def _auto(rows):
    return [r for r in rows if r.kind == "auto"]


def test_auto_rows_run_the_resolved_recipe_within_the_budget(splits, bench_result, tmp_path):
    from featdp.methods import get_method
    from featdp.training import fit

    rows = _auto(bench_result.rows)
    assert sorted((r.method, r.epsilon, r.seed) for r in rows) == [
        ("dp-sgd", e, s) for e in (1.0, 8.0) for s in (0, 1)]  # dp-ls has no recipe: no auto rows
    for row in rows:
        assert row.hyperparameters["recipe"] == "manual" and row.hyperparameters["steps"] > 1
        assert row.epsilon_spent <= row.epsilon and row.delta_spent <= row.delta == 1e-4 and row.noise_scale > 0
        assert row.mean_runs is None and row.validation_accuracy is None
    assert planned_rows(bench_result.config) == len(bench_result.rows)  # progress totals stay exact
    # A row is `featdp fit --method dp-sgd --set recipe=auto --seed s`, and records what that fit ran.
    train, test = splits
    row = next(r for r in rows if (r.epsilon, r.seed) == (1.0, 1))
    again = fit(train, get_method("dp-sgd", recipe="auto"), epsilon=1.0, delta=1e-4, seed=1)
    assert again.accuracy(test) == row.accuracy and again.method.hyperparameters() == row.hyperparameters
    text = report.markdown(bench_result, "t", "cmd")
    assert "| recipe=auto (epochs from ñ·ε) | dp-sgd |" in text and "benchmarks/choose_epochs.py" in text
    steps = row.hyperparameters["steps"]
    assert f"* dp-sgd recipe=auto at ε = 1: {steps} steps, schedule {row.hyperparameters['schedule']}" in text
    report.write_all(bench_result, tmp_path, "b", "b", "cmd")
    records = [r for r in csv.DictReader(io.StringIO((tmp_path / "b.csv").read_text())) if r["kind"] == "auto"]
    assert len(records) == 4 and all(json.loads(r["hyperparameters"])["recipe"] == "manual" for r in records)


def test_auto_off_makes_no_auto_rows(splits):
    config = BenchConfig(epsilons=(2.0,), delta=1e-4, seeds=1, methods=("dp-sgd",), tune=False,
                         private_tune=False, references=False, auto=False)
    result = run_bench(*splits, config)
    assert [r.kind for r in result.rows] == ["default"] and planned_rows(config) == 1
    assert "recipe=auto" not in report.markdown(result, "t", "cmd")


def test_only_methods_with_a_recipe_field_get_auto_rows():
    assert {name for name in registry() if has_auto_recipe(name)} == {"dp-sgd"}
    others = tuple(n for n, cls in registry().items() if cls.private and not has_auto_recipe(n))
    assert others and has_auto_recipe("dp-sgd")
    with_auto = BenchConfig(epsilons=(1.0, 2.0), seeds=3, methods=others)
    assert planned_rows(with_auto) == planned_rows(BenchConfig(epsilons=(1.0, 2.0), seeds=3, methods=others,
                                                               auto=False))
    with_sgd = BenchConfig(epsilons=(1.0, 2.0), seeds=3, methods=("dp-sgd",))
    assert planned_rows(with_sgd) == planned_rows(BenchConfig(epsilons=(1.0, 2.0), seeds=3, methods=("dp-sgd",),
                                                              auto=False)) + 2 * 3


def test_cli_bench_auto_option(tmp_path):
    path = _feature_file(tmp_path)
    args = ["bench", str(path), "--eps", "4", "--seeds", "1", "--methods", "dp-sgd", "--no-references", "--no-tune",
            "--no-private-tune"]
    kinds = {}
    for flag in ("--auto", "--no-auto"):
        result = CliRunner().invoke(app, [*args, flag, "--out", str(tmp_path / flag)])
        assert result.exit_code == 0, result.output
        kinds[flag] = sorted(r["kind"] for r in json.loads((tmp_path / flag / "f.json").read_text())["rows"])
    assert kinds == {"--auto": ["auto", "default"], "--no-auto": ["default"]}
    assert "| recipe=auto (epochs from ñ·ε) | dp-sgd |" in (tmp_path / "--auto" / "f.md").read_text()


# ----------------------------------------------------------------------------------------------- memory


def test_splits_beyond_the_budget_are_streamed_with_the_same_rows(tmp_path):
    from featdp.bench.runner import load_splits
    from featdp.featurefile import Split

    path = _feature_file(tmp_path)
    train_bytes, test_bytes = 240 * 6 * 4, 60 * 6 * 4
    held = load_splits(path)
    assert all(isinstance(s, ArraySource) and not s.features.flags.writeable for s in held)
    partly = load_splits(path, budget_bytes=train_bytes + test_bytes - 1)  # train held first, test streamed
    assert isinstance(partly[0], ArraySource) and isinstance(partly[1], Split)
    streamed = load_splits(path, budget_bytes=0)
    assert all(isinstance(s, Split) for s in streamed)
    config = BenchConfig(epsilons=(2.0,), delta=1e-4, seeds=2, methods=("dp-ls",), peers=("sklearn-logreg",))
    in_memory, from_file = run_bench(*held, config), run_bench(*streamed, config)
    # The same blocks, so the same sums and the same seeded noise: every row equal.
    assert [(r.kind, r.method, r.seed, r.accuracy) for r in from_file.rows if r.kind != "peer"] == \
        [(r.kind, r.method, r.seed, r.accuracy) for r in in_memory.rows if r.kind != "peer"]
    assert "peer" not in {r.kind for r in from_file.rows} and "in memory" in from_file.skipped["sklearn-logreg"]
