"""`featdp tune`: private selection by random stopping — its accounting, its split, its draws, its choice,
and every kind of bad input failing cleanly with nothing written."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event as events
from dp_accounting.rdp import rdp_privacy_accountant

from conftest import invoke, make_blobs, write_feature_file
from featdp import accounting, selection
from featdp.data import ArraySource
from featdp.methods import get_method
from featdp.randomness import RootKey
from featdp.training import COUNT_SHARE


@pytest.fixture(scope="module")
def blobs():
    x, y = make_blobs(n=600, d=8, k=3)
    return ArraySource(x, y, 3)


@pytest.fixture(scope="module")
def tuned(blobs):
    return selection.select(blobs, ["dp-ls", "dp-fc"], epsilon=2.0, delta=1e-5, mean_runs=3, seed=0)


def rdp_epsilon(event, delta):
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=accounting.NEIGHBORING_RELATION)
    return accountant.compose(event).get_epsilon(delta)


def test_reported_epsilon_is_the_rdp_accountants_and_within_the_target(tuned):
    privacy, sigma = tuned.privacy, tuned.noise_multiplier
    event = events.RepeatAndSelectDpEvent(events.GaussianDpEvent(sigma), 3.0, 1.0)
    assert tuned.event == event
    assert privacy.selection_epsilon == pytest.approx(rdp_epsilon(event, privacy.selection_delta), rel=1e-12)
    assert privacy.count_epsilon == pytest.approx(COUNT_SHARE * 2.0)
    ideal = privacy.count_epsilon + privacy.selection_epsilon
    assert ideal <= privacy.epsilon <= 2.0 and privacy.epsilon - ideal < 1e-6
    assert privacy.count_delta + privacy.selection_delta <= privacy.delta <= 1e-5
    # The calibration is tight: a little less noise per run would overshoot the selection's share.
    slack = privacy.epsilon - ideal
    cheaper = events.RepeatAndSelectDpEvent(events.GaussianDpEvent(sigma * 0.99), 3.0, 1.0)
    assert privacy.count_epsilon + rdp_epsilon(cheaper, privacy.selection_delta) + slack > 2.0
    # Every run, fit and score, is dominated by the Gaussian the accountant was given.
    for run in tuned.runs:
        assert selection.is_dominated(run.method.dp_event(run.noise_scale, tuned.public_fit_size), sigma)
        assert run.noise_scale == pytest.approx(sigma, rel=2e-4)  # full-batch candidates: the same Gaussian
    score = [r for r in tuned.releases if r.name == "validation_correct"]
    assert len(score) == 1 and score[0].noise_multiplier == sigma and score[0].sensitivity == 1.0


def test_the_report_holds_the_best_run_only(tuned):
    report = selection.selection_report(tuned)
    text = json.dumps(report)
    assert report["method"] == tuned.method.name and report["hyperparameters"] == tuned.method.hyperparameters()
    assert report["validation"]["noisy_correct"] == tuned.best.noisy_correct
    assert report["validation"]["noisy_correct"] == max(run.noisy_correct for run in tuned.runs)
    assert report["selection"]["number_of_runs"].startswith("withheld")
    assert "runs" not in report and str(tuned.num_runs) not in report["selection"]["number_of_runs"]
    assert [r["name"] for r in report["releases"]][0] == "num_examples"
    assert sum(r["name"] == "validation_correct" for r in report["releases"]) == 1
    dp_event = report["dp_event"]
    assert dp_event["type"] == "RepeatAndSelectDpEvent" and dp_event["mean"] == 3.0 and dp_event["shape"] == 1.0
    assert dp_event["event"]["type"] == "GaussianDpEvent"
    rebuilt = events.RepeatAndSelectDpEvent(
        events.GaussianDpEvent(dp_event["event"]["noise_multiplier"]), dp_event["mean"], dp_event["shape"])
    assert rdp_epsilon(rebuilt, report["selection_delta"]) == pytest.approx(report["selection_epsilon"], rel=1e-12)
    assert report["epsilon"] <= report["target_epsilon"] and report["delta"] <= report["target_delta"]
    assert report["num_examples_released"] == tuned.count.value and "num_examples" in report["public"]
    assert len(report["selection"]["candidates"]) == len(tuned.candidates) == 8  # dp-ls 4 + dp-fc 4
    assert report["sampler"]["coordinates_bound"] >= report["sampler"]["runs_cap"] * 2
    assert "NaN" not in text and "Infinity" not in text


def test_the_split_is_a_function_of_each_example_alone():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 6)).astype(np.float32)
    y = rng.integers(0, 5, size=4000)
    mask = selection.in_validation(x, y)
    assert abs(mask.mean() - selection.VALIDATION_FRACTION) < 5 * math.sqrt(0.09 / 4000)
    for row in (0, 1, 17, 2000, 3999):  # removing one example moves no other example
        assert np.array_equal(selection.in_validation(np.delete(x, row, 0), np.delete(y, row)), np.delete(mask, row))
    extra = rng.normal(size=(1, 6)).astype(np.float32)
    grown = selection.in_validation(np.concatenate([x[:10], extra, x[10:]]), np.concatenate([y[:10], [3], y[10:]]))
    assert np.array_equal(np.delete(grown, 10), mask)
    order = rng.permutation(4000)
    assert np.array_equal(selection.in_validation(x[order], y[order]), mask[order])
    # The label is part of the example: the same features with another label may land elsewhere.
    relabelled = selection.in_validation(x, (y + 1) % 5)
    assert not np.array_equal(relabelled, mask)
    fit_part, validation_part = selection.split_parts(ArraySource(x, y, 5))
    assert validation_part.num_examples == mask.sum() and fit_part.num_examples == (~mask).sum()
    assert np.array_equal(validation_part.mask, mask) and np.array_equal(fit_part.mask, ~mask)
    assert np.array_equal(np.vstack([rows for rows, _ in validation_part.blocks()]), x[mask])


def test_a_poisson_sampled_candidate_is_dominated_by_the_run_gaussian():
    sigma, public = 2.0, 500.0
    method = get_method("dp-sgd", steps=20, batch_size=50)
    scale = selection.dominating_noise_scale(method, sigma, public)
    event = method.dp_event(scale, public)
    assert isinstance(event.event, events.PoissonSampledDpEvent)
    orders, bound = selection.gaussian_bound(sigma)
    assert np.allclose(bound, orders / (2 * sigma**2))
    _, upper = selection.rdp_upper_curve(event)
    assert np.all(upper <= bound)
    # At integer orders dp-accounting's subsampled-Gaussian RDP is a closed form: check it directly there.
    integers = np.arange(2, 65, dtype=float)
    direct = rdp_privacy_accountant.RdpAccountant(integers, accounting.NEIGHBORING_RELATION).compose(event)
    assert np.all(direct.rdp <= integers / (2 * sigma**2))
    # Tight to the bisection's tolerance, and well below the unsampled scale σ·√steps.
    assert not selection.is_dominated(method.dp_event(scale / (1 + 3 * selection.DOMINATION_TOLERANCE), public), sigma)
    assert scale < 0.9 * sigma * math.sqrt(20)
    full_batch = selection.dominating_noise_scale(get_method("dp-fc"), sigma, public)
    assert sigma <= full_batch <= sigma * (1 + 2 * selection.DOMINATION_TOLERANCE)


def test_seeded_selections_are_reproducible(blobs):
    progress = []

    def run(seed):
        progress.clear()
        return selection.select(blobs, ["dp-ls"], epsilon=1.0, delta=1e-5, mean_runs=3, seed=seed,
                                on_run=lambda done, total: progress.append((done, total)))

    first = run(11)
    assert progress == [(done, first.num_runs) for done in range(first.num_runs + 1)]
    again, other = run(11), run(12)
    assert first.num_runs == again.num_runs
    assert [(r.method, r.noisy_correct) for r in first.runs] == [(r.method, r.noisy_correct) for r in again.runs]
    assert np.array_equal(first.weights, again.weights) and first.count == again.count
    assert selection.selection_report(first) == selection.selection_report(again)
    assert [r.noisy_correct for r in other.runs] != [r.noisy_correct for r in first.runs]


@pytest.mark.parametrize("mean, shape", [(4.0, 1.0), (3.0, 2.0), (5.0, 0.0), (1.0, 1.0)])
def test_the_number_of_runs_follows_its_law(mean, shape):
    law = selection.RunsDistribution(mean, shape)
    pmf = np.array([law.pmf(k) for k in range(1, 400)])
    assert pmf.sum() == pytest.approx(1.0, abs=1e-12)
    assert (np.arange(1, 400) * pmf).sum() == pytest.approx(mean, rel=1e-9)
    if shape == 1.0:
        gamma = 1 / mean
        assert np.allclose(pmf[:20], gamma * (1 - gamma) ** np.arange(20), rtol=1e-12)
    stream = RootKey.from_seed(0).child("law", mean, shape).stream()
    draws = np.array([law.sample(stream) for _ in range(20000)])
    assert draws.min() >= 1
    counts = np.bincount(draws, minlength=400)[1:400] / len(draws)
    assert 0.5 * np.abs(counts - pmf).sum() < 0.02  # total variation, 20000 draws
    sd = math.sqrt((np.arange(1, 400) ** 2 * pmf).sum() - mean**2)
    assert abs(draws.mean() - mean) <= 4 * sd / math.sqrt(len(draws)) + 1e-12
    cap = law.cap(1e-9)
    assert law.survival(cap) <= 1e-9 < law.survival(cap - 1) or (cap == 1 and mean == 1.0)


def test_selection_prefers_a_clearly_better_candidate(blobs):
    # gram_share = 0.99999 leaves the class sums ~316× the noise: a head no better than chance.
    result = selection.select(blobs, ["dp-ls"], grid={"gram_share": ["0.5", "0.99999"]}, epsilon=4.0, delta=1e-5,
                              mean_runs=6, seed=2)
    good = [r.noisy_correct for r in result.runs if r.method.gram_share == 0.5]
    bad = [r.noisy_correct for r in result.runs if r.method.gram_share == 0.99999]
    assert good and bad, "the seed should draw both candidates"
    assert min(good) > max(bad)
    assert result.method.gram_share == 0.5 and result.best.noisy_correct == max(good)
    assert result.accuracy(blobs) > 0.8


def test_grid_candidates_and_their_errors():
    candidates = selection.build_candidates(["dp-fc", "dp-sgd"], {"lr": ["1", "2"], "steps": ["1", "3"]}, 100.0)
    assert len(candidates) == 8 and {c.name for c in candidates} == {"dp-fc", "dp-sgd"}
    assert {(c.lr, c.steps) for c in candidates if c.name == "dp-sgd"} == {(1.0, 1), (1.0, 3), (2.0, 1), (2.0, 3)}
    assert len(selection.build_candidates(["dp-ls"], {"lam_scale": ["1", "1.0"]}, 100.0)) == 1  # duplicates dropped
    assert selection.parse_grid(["lr=1, 2", "steps=3"]) == {"lr": ["1", "2"], "steps": ["3"]}
    for bad in (["lr="], ["lr"], ["=1"], ["lr=1,,2"], ["lr=1", "lr=2"]):
        with pytest.raises(selection.SelectionError):
            selection.parse_grid(bad)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def features(tmp_path):
    return write_feature_file(tmp_path / "features.h5", n=480, test=80)


def test_tune_writes_the_chosen_head_and_its_report(features, tmp_path):
    out = tmp_path / "tuned"
    result = invoke("tune", features, "--method", "dp-ls", "--method", "dp-fc", "--grid", "lam_scale=0.3,1",
                    "--eps", "2", "--delta", "1e-6", "--mean-runs", "3", "--seed", "7", "--out", out)
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output and "not reported" in result.output
    head = np.load(out / "head.npz")
    assert head["weights"].shape == (8, 3)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["job"] == "tune" and report["method"] in ("dp-ls", "dp-fc")
    assert report["hyperparameters"]["lam_scale"] in (0.3, 1.0) and len(report["selection"]["candidates"]) == 4
    assert report["epsilon"] <= 2.0 and report["delta"] <= 1e-6 and report["noise_seeded"] is True
    assert report["selection"]["mean_runs"] == 3.0 and "geometric" in report["selection"]["distribution"]
    assert "runs" not in report and 0 <= report["test_accuracy"] <= 1 and len(report["input_sha256"]) == 64
    event = events.RepeatAndSelectDpEvent(events.GaussianDpEvent(report["selection"]["run_noise_multiplier"]), 3.0, 1.0)
    assert rdp_epsilon(event, report["selection_delta"]) == pytest.approx(report["selection_epsilon"], rel=1e-12)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--grid", "lr="], "'lr='"),
        (["--grid", "lr"], "'lr'"),
        (["--grid", "=1"], "'=1'"),
        (["--grid", "lr=1,,2"], "'lr=1,,2'"),
        (["--grid", "gram_share=0.5,0.9"], "'gram_share' is not a hyperparameter of method 'dp-fc'"),
        (["--method", "dp-ls", "--grid", "lr=1,2"], "'lr' is not a hyperparameter of method 'dp-ls'"),
        (["--grid", "steps=1,many"], "steps='many'"),
        (["--grid", "lr=-1"], "lr must be > 0"),
        (["--mean-runs", "0.5"], "0.5"),
        (["--mean-runs", "0"], "got 0"),
        (["--mean-runs", "nan"], "nan"),
        (["--mean-runs", "inf"], "inf"),
        (["--shape", "-1"], "-1"),
        (["--eps", "0.005", "--delta", "1e-6"], "too small"),
        (["--eps", "0"], "epsilon"),
        (["--method", "dp-magic"], "unknown method 'dp-magic'"),
        (["--method", "ridge"], "'ridge' is not private"),
        (["--method", "logreg"], "'logreg' is not private"),
        (["--accountant", "pld"], "'pld'"),
        (["--delta", "1"], "delta"),
    ],
)
def test_bad_arguments_fail_cleanly(features, tmp_path, args, fragment):
    out = tmp_path / "out"
    eps = [] if "--eps" in args else ["--eps", "1"]
    result = invoke("tune", features, *eps, "--seed", "0", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and fragment in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_tune_needs_epsilon(features, tmp_path):
    result = invoke("tune", features, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "error:" in result.output and "--eps" in result.output
    assert not (tmp_path / "out").exists()
