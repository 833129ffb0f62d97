"""Learning-rate schedules and iterate averages of the gradient methods (featdp/methods/_trajectory.py):
neither changes what is released or accounted, and each follows the rule it states."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest

from conftest import run_recorded
from featdp.methods import HyperparameterError, get_method, registry
from featdp.methods import _trajectory as trajectory
from featdp.training import fit

GRADIENT_METHODS = ["dp-sgd", "dp-fc"]
STEPS = 6
AVERAGES = [{"average": "ema", "ema_decay": 0.7}, {"average": "tail", "tail_fraction": 0.5}]


def sgd_trajectory(recorder, lr: Callable[[int], float], num_examples: int) -> list[np.ndarray]:
    """The heads W_1 … W_T of full-batch dp-sgd (sgd, no momentum) rebuilt from its recorded releases:
    W_{t+1} = W_t − lr_t · released_t / ñ."""
    weights, heads = np.zeros_like(recorder.released[0]), []
    for t, released in enumerate(recorder.released):
        weights = weights - lr(t) * released / num_examples
        heads.append(weights)
    return heads


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("average", AVERAGES, ids=lambda a: a["average"])
def test_averaging_releases_the_same_statistics_and_accounts_the_same(name, average, blobs):
    plain, plain_record = run_recorded(name, {"steps": STEPS}, blobs, noise_scale=2.0, seed=3)
    averaged, averaged_record = run_recorded(name, {"steps": STEPS, **average}, blobs, noise_scale=2.0, seed=3)
    assert averaged_record.releases == plain_record.releases
    for a, b in zip(averaged_record.released, plain_record.released, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(averaged, plain)  # the average is another head, from the same releases
    base, other = get_method(name, steps=STEPS), get_method(name, steps=STEPS, **average)
    for scale in (0.7, 2.0):
        assert other.dp_event(scale, 300) == base.dp_event(scale, 300)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_schedule_moves_the_heads_but_not_the_accounting(name, schedule, blobs):
    plain = fit(blobs, name, epsilon=1.0, delta=1e-5, seed=2, hyperparameters={"steps": STEPS})
    scheduled = fit(blobs, name, epsilon=1.0, delta=1e-5, seed=2, hyperparameters={"steps": STEPS, "schedule": schedule})
    assert scheduled.calibration.noise_scale == plain.calibration.noise_scale
    assert scheduled.calibration.event == plain.calibration.event
    # Same names, sensitivities and noise multipliers: only the heads the gradients are taken at differ.
    assert [(r.name, r.sensitivity, r.noise_multiplier) for r in scheduled.releases] == [
        (r.name, r.sensitivity, r.noise_multiplier) for r in plain.releases
    ]
    assert not np.allclose(scheduled.weights, plain.weights)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_decay_zero_and_a_one_step_tail_return_the_last_head(name, blobs):
    last, _ = run_recorded(name, {"steps": STEPS}, blobs, noise_scale=1.5, seed=5)
    for average in ({"average": "ema", "ema_decay": 0.0}, {"average": "tail", "tail_fraction": 1 / STEPS}):
        head, _ = run_recorded(name, {"steps": STEPS, **average}, blobs, noise_scale=1.5, seed=5)
        np.testing.assert_array_equal(head, last)


def test_the_ema_and_the_tail_mean_are_the_stated_weighted_means_of_the_heads(blobs):
    lr, decay = 2.0, 0.6
    hp = {"steps": STEPS, "lr": lr}
    _, recorder = run_recorded("dp-sgd", hp, blobs, noise_scale=1.5, seed=1)
    heads = sgd_trajectory(recorder, lambda t: lr, blobs.num_examples)
    ema, _ = run_recorded("dp-sgd", hp | {"average": "ema", "ema_decay": decay}, blobs, noise_scale=1.5, seed=1)
    weights = decay ** np.arange(STEPS - 1, -1, -1.0)
    np.testing.assert_allclose(ema, np.tensordot(weights, heads, 1) / weights.sum(), rtol=1e-5, atol=1e-7)
    tail, _ = run_recorded("dp-sgd", hp | {"average": "tail", "tail_fraction": 0.5}, blobs, noise_scale=1.5, seed=1)
    np.testing.assert_allclose(tail, np.mean(heads[STEPS // 2 :], axis=0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_dp_sgd_steps_at_the_scheduled_rate(schedule, blobs):
    lr = 3.0
    expected = {
        "constant": lambda t: lr,
        "cosine": lambda t: lr * (1 + math.cos(math.pi * t / STEPS)) / 2,
        "linear": lambda t: lr * (1 - t / STEPS),
    }[schedule]
    head, recorder = run_recorded("dp-sgd", {"steps": STEPS, "lr": lr, "schedule": schedule}, blobs,
                                  noise_scale=1.5, seed=4)
    # The head fit returns is the one the stated rates give from its own releases, the last step included.
    np.testing.assert_allclose(head, sgd_trajectory(recorder, expected, blobs.num_examples)[-1], rtol=1e-5, atol=1e-7)
    rate = trajectory.learning_rate(lr, schedule, STEPS)
    last = rate if schedule == "constant" else float(rate(STEPS - 1))
    assert last == pytest.approx(expected(STEPS - 1), rel=1e-6)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
@pytest.mark.parametrize(("key", "value"), [
    ("schedule", "step"), ("average", "swa"), ("ema_decay", 1.0), ("ema_decay", -0.1), ("tail_fraction", 0.0),
    ("tail_fraction", 1.5),
])
def test_out_of_range_trajectory_options_are_refused_by_name(name, key, value):
    with pytest.raises(HyperparameterError, match=key):
        get_method(name, **{key: value})


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_trajectory_options_parse_from_cli_strings_and_are_described(name):
    cls = registry()[name]
    method = cls.from_strings({"schedule": "cosine", "average": "ema", "ema_decay": "0.9", "tail_fraction": "0.25"})
    assert (method.schedule, method.average, method.ema_decay, method.tail_fraction) == ("cosine", "ema", 0.9, 0.25)
    described = cls.hyperparameter_help()
    assert all(described[key] for key in ("schedule", "average", "ema_decay", "tail_fraction"))


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_defaults_keep_the_last_head_at_a_constant_rate(name):
    method = get_method(name)
    assert (method.schedule, method.average) == ("constant", "none")
    assert trajectory.IterateAverage.of(method, 10) == trajectory.IterateAverage(0.0, 9)  # the last head, and no work before it
    assert trajectory.learning_rate(method.lr, method.schedule, 10) == method.lr
