"""Peer libraries (featdp.bench.peers): each available peer runs, beats chance at a large ε, and reports
the right fields; an unavailable one says why.

The diffprivlib test creates its environment on first use (~20 s with the local package index) under
$FEATDP_PEER_ENVS or ~/.cache/featdp/peer-envs, and reuses it afterwards; it skips, with the reason, where
that environment cannot be created.
"""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest

from featdp.bench import peers
from featdp.data import Preprocessing

K = 3


@pytest.fixture(scope="module")
def data():
    """2000 train + 500 test rows of 3 separated Gaussian classes in 20 dimensions, unit-normalized."""
    rng = np.random.default_rng(0)
    means = 3 * rng.normal(size=(K, 20))
    y = rng.integers(0, K, size=2500)
    x = Preprocessing()(means[y] + rng.normal(size=(2500, 20)))
    return x[:2000], y[:2000], x[2000:], y[2000:]


def _check_result(result, name, epsilon, delta, overrides=None, seed=0):
    assert isinstance(result, peers.PeerResult)
    assert (result.peer, result.epsilon, result.delta, result.seed) == (name, epsilon, delta, seed)
    assert 0 <= result.accuracy <= 1
    assert result.accuracy > 1 / K + 0.3, f"{name} at eps={epsilon}: {result.accuracy} is barely above chance"
    assert result.seconds > 0
    expected = peers.default_settings(name) | (overrides or {})
    assert {key: result.settings.get(key) for key in expected} == expected


def test_registry_names():
    assert peers.PEERS == ("opacus-dpsgd", "diffprivlib-logreg", "sklearn-logreg")
    assert peers.peer_available("sklearn-logreg") is None
    assert [peers.is_private(name) for name in peers.PEERS] == [True, True, False]
    for name in peers.PEERS:
        reason = peers.peer_available(name)
        assert reason is None or (isinstance(reason, str) and "\n" not in reason)


def test_unknown_peer_is_named():
    assert "unknown peer 'nope'" in peers.peer_available("nope")
    assert "sklearn-logreg" in peers.peer_available("nope")
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        peers.run_peer("nope", *[np.zeros((2, 2), np.float32), np.zeros(2, int)] * 2, 2, 1.0, 1e-5, 0)


def test_missing_opacus_gives_the_install_command(monkeypatch, data):
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda m, *a: None if m == "opacus" else real(m, *a))
    reason = peers.peer_available("opacus-dpsgd")
    assert reason == "opacus is not installed: pip install 'featdp[peers]'"
    with pytest.raises(peers.PeerUnavailableError, match=r"featdp\[peers\]"):
        peers.run_peer("opacus-dpsgd", *data, K, 1.0, 1e-5, 0)


def test_diffprivlib_without_venv_support_gives_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATDP_PEER_ENVS", str(tmp_path / "envs"))
    real = peers.importlib.util.find_spec
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda m, *a: None if m == "ensurepip" else real(m, *a))
    assert "python3-venv" in peers.peer_available("diffprivlib-logreg")


def test_failed_env_creation_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("FEATDP_PEER_ENVS", str(tmp_path))
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        if "venv" in command:
            (tmp_path / "diffprivlib" / "bin").mkdir(parents=True)
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(peers.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match=r"pip install .*diffprivlib==0\.6\.6 scikit-learn==1\.7\.2") as info:
        peers.ensure_diffprivlib_env()
    assert "No matching distribution" in str(info.value)
    assert len(calls) == 2 and not (tmp_path / "diffprivlib").exists()  # a half-made env is removed


def test_rows_above_the_norm_bound_are_refused(data):
    x, y, tx, ty = data
    with pytest.raises(ValueError, match="L2 norm <= 1.0"):
        peers.run_peer("sklearn-logreg", 2 * x, y, tx, ty, K, None, None, 0)


def test_privacy_parameters_are_required(data):
    with pytest.raises(ValueError, match="epsilon must be a positive"):
        peers.run_peer("diffprivlib-logreg", *data, K, None, None, 0)
    with pytest.raises(ValueError, match="unknown setting"):
        peers.run_peer("sklearn-logreg", *data, K, None, None, 0, settings={"epochs": 3})


def test_sklearn(data):
    result = peers.run_peer("sklearn-logreg", *data, K, 3.0, 1e-5, 0)
    _check_result(result, "sklearn-logreg", None, None)
    assert result.settings["converged"]


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_opacus(data):
    pytest.importorskip("opacus", reason="opacus is not installed: pip install 'featdp[peers]'")
    # Opacus' GDP accountant calibrates in ~0.2 s; its PRV (the default) and RDP ones take 2-20 s at q = 0.2.
    quick = {"epochs": 4, "batch_size": 400, "accountant": "gdp"}
    result = peers.run_peer("opacus-dpsgd", *data, K, 4.0, 1e-5, 0, settings=quick)
    _check_result(result, "opacus-dpsgd", 4.0, 1e-5, quick)
    s = result.settings
    assert s["sample_rate"] == 1 / 5 and s["expected_batch_size"] == 400 and s["steps"] == 4 * 5
    assert s["noise_multiplier"] > 0.5
    assert 3.9 < s["epsilon_spent"] <= 4.0 + 1e-6
    again = peers.run_peer("opacus-dpsgd", *data, K, 4.0, 1e-5, 0, settings=quick)
    assert dataclasses.replace(again, seconds=0, settings={}) == dataclasses.replace(result, seconds=0, settings={})


@pytest.fixture(scope="module")
def diffprivlib_env():
    reason = peers.peer_available("diffprivlib-logreg")
    if reason is not None:
        pytest.skip(reason)
    try:
        return peers.ensure_diffprivlib_env()
    except RuntimeError as exc:
        pytest.skip(f"cannot create the diffprivlib environment: {exc}")


def test_diffprivlib(data, diffprivlib_env):
    result = peers.run_peer("diffprivlib-logreg", *data, K, 30.0, 1e-5, 0)
    _check_result(result, "diffprivlib-logreg", 30.0, 0.0)
    s = result.settings
    assert s["data_norm"] == 1.0 and s["random_state"] == 0 and s["epsilon_per_class"] == 10.0
    assert s["versions"]["diffprivlib"] == "0.6.6" and s["versions"]["scikit-learn"] == "1.7.2"
    assert not any("PrivacyLeakWarning" in w for w in s["warnings"])
