"""dp-sgd's recipe=auto: hyperparameters chosen from the public budget (ñ, ε, d) before anything is
accounted, the same way in a fit, a selection and an audit; refused beside the fields it chooses."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest

from conftest import invoke, write_feature_file
from featdp import centering, selection
from featdp.audit import white_box_audit
from featdp.audit.design import AuditData, at_budget
from featdp.methods import HyperparameterError, get_method
from featdp.methods.dp_sgd import AUTO_CENTER_SHARE, AUTO_EPOCHS, AUTO_FIELDS, auto_recipe
from featdp.training import SAMPLER_RESERVE, fit


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_bands_are_the_rule_the_committed_proxy_table_gives():
    spec = importlib.util.spec_from_file_location("choose_epochs", ROOT / "benchmarks" / "choose_epochs.py")
    choose_epochs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(choose_epochs)
    cells = choose_epochs.read_cells((ROOT / "benchmarks" / "results" / "choose_epochs.md").read_text())
    assert len({name for _, name, _ in cells}) == len(choose_epochs.PROXIES)  # every proxy, no FMNIST
    rule, _, _ = choose_epochs.best_rule(cells)
    assert rule == AUTO_EPOCHS


@pytest.mark.parametrize("field", AUTO_FIELDS)
def test_auto_refuses_a_field_it_chooses(field):
    value = {"optimizer": "adam", "schedule": "cosine", "momentum": 0.5}.get(field, 3)
    with pytest.raises(HyperparameterError, match=f"recipe=auto chooses {field}"):
        get_method("dp-sgd", recipe="auto", **{field: value})


def test_auto_refuses_a_field_it_chooses_even_at_its_default():
    with pytest.raises(HyperparameterError, match="recipe=auto chooses steps"):
        get_method("dp-sgd", recipe="auto", steps=1)
    with pytest.raises(HyperparameterError, match="recipe=auto chooses"):
        type(get_method("dp-sgd")).from_strings({"recipe": "auto", "batch_size": "none"})


def test_an_unresolved_auto_recipe_has_no_preprocessing():
    with pytest.raises(ValueError, match="for_budget"):
        get_method("dp-sgd", recipe="auto").preprocessing()


def test_auto_keeps_the_fields_it_does_not_choose():
    method = get_method("dp-sgd", recipe="auto", average="ema", normalize="clip")
    resolved = method.for_budget(1000.0, 2.0, 16)
    assert resolved.average == "ema" and resolved.normalize == "clip" and resolved.recipe == "manual"


def test_an_unresolved_auto_recipe_is_never_accounted():
    with pytest.raises(ValueError, match="for_budget"):
        get_method("dp-sgd", recipe="auto").dp_event(1.0, 1000)


def test_the_recipe_is_a_function_of_the_budget_alone():
    bands = [0.0] + [below for below, _, _ in AUTO_EPOCHS[:-1]]
    steps = []
    for low in bands:
        budget = low + 1.0
        one, other = auto_recipe(budget, 1.0, 64), auto_recipe(budget / 4, 4.0, 64)
        assert {k: v for k, v in one.items() if k != "batch_size"} == {
            k: v for k, v in other.items() if k != "batch_size"}
        steps.append(one["steps"])
    assert steps == sorted(steps) and len(set(steps)) > 1  # more epochs as the budget grows
    recipe = auto_recipe(60000, 3.0, 3969)
    assert recipe["clip_norm"] == 63.0 and recipe["batch_size"] == 8192 and recipe["grad_clip"] == 0.1


def test_a_fit_runs_the_recipe_of_its_released_count_and_epsilon(blobs):
    result = fit(blobs, "dp-sgd", epsilon=2.0, delta=1e-5, seed=0, hyperparameters={"recipe": "auto"})
    assert result.count.value != result.num_examples  # so the recipe below is the released count's
    method_epsilon = (result.target.epsilon - result.count.epsilon) * (1 - SAMPLER_RESERVE)
    expected = auto_recipe(result.count.value, method_epsilon, blobs.feature_dim)
    assert result.method.recipe == "manual"
    assert {k: getattr(result.method, k) for k in expected} == expected
    # The recipe centres: the mean's Gaussian is composed with the steps' event.
    assert result.method.center == AUTO_CENTER_SHARE and result.center is not None
    assert result.calibration.event == centering.with_mean(
        result.method.dp_event(result.calibration.noise_scale, result.count.value), result.center_noise_multiplier)
    gradient_steps = [r for r in result.releases if r.name == "gradient_sum"]
    assert len(gradient_steps) == expected["steps"]
    assert result.privacy.epsilon <= 2.0


def test_a_selection_resolves_auto_candidates_from_its_fit_part(blobs):
    result = selection.select(blobs, "dp-sgd", epsilon=4.0, delta=1e-5, seed=1, mean_runs=2,
                              grid={"recipe": ["auto"]})
    (candidate,) = result.candidates
    expected = auto_recipe(result.public_fit_size, 4.0 - result.count.epsilon, blobs.feature_dim)
    assert candidate.recipe == "manual" and {k: getattr(candidate, k) for k in expected} == expected
    assert result.privacy.epsilon <= 4.0


def test_an_audit_checks_the_resolved_recipe():
    result = white_box_audit(get_method("dp-sgd", recipe="auto"), 4.0, trials=20, seed=0)
    assert result.passed, result
    # The audit examines the recipe's own releases (its steps); the centring it chose is left out.
    audited = at_budget(get_method("dp-sgd", recipe="auto"), 4.0, AuditData(), 1)
    assert audited.recipe == "manual" and audited.steps > 1 and audited.center == 0.0


def test_cli_audit_of_the_recipe_says_its_centring_is_not_audited():
    result = invoke("audit", "--method", "dp-sgd", "--set", "recipe=auto", "--eps", "4", "--mode", "white-box",
                    "--trials", "20", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert "centring" in result.output and "is not audited" in result.output


def test_cli_fit_reports_the_hyperparameters_that_ran(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-sgd", "--set", "recipe=auto", "--eps", "2", "--seed", "1",
                    "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "privacy_report.json").read_text())
    hyperparameters = report["hyperparameters"]
    assert hyperparameters["recipe"] == "manual" and hyperparameters["steps"] > 1
    assert math.isclose(hyperparameters["clip_norm"], math.sqrt(8))
    chosen = report["hyperparameters_from_budget"]
    assert chosen["requested"] == {"recipe": "auto"} and chosen["released_count"] == report["num_examples_released"]
    # The summary names what ran, pasteable as --set.
    assert f"steps={hyperparameters['steps']}" in result.output and "schedule=" in result.output


def test_cli_refuses_auto_beside_a_field_it_chooses(tmp_path):
    features = write_feature_file(tmp_path / "features.h5")
    out = tmp_path / "head"
    result = invoke("fit", features, "--method", "dp-sgd", "--set", "recipe=auto", "--set", "steps=5", "--eps", "2",
                    "--out", out)
    assert result.exit_code == 2
    assert "error:" in result.output and "recipe=auto chooses steps" in result.output
    assert "Traceback" not in result.output and not out.exists()
