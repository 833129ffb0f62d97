"""With noise switched off (noise_scale = 0, reachable only from code), each method equals a closed form."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from conftest import make_blobs, run_recorded
from featdp.data import ArraySource, Preprocessing


def normalized(source):
    return Preprocessing()(source.features)


def test_dp_ls_without_noise_is_numpy_ridge(blobs):
    lam = 3.0
    weights, _ = run_recorded("dp-ls", {"lam": lam}, blobs, noise_scale=0.0)
    x = normalized(blobs).astype(np.float64)
    y = np.eye(blobs.num_classes)[blobs.labels]
    expected = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)


def test_one_step_dp_sgd_without_noise_is_the_class_sum_classifier(blobs):
    weights, _ = run_recorded("dp-sgd", {"lr": 2.0}, blobs, noise_scale=0.0)
    x = normalized(blobs).astype(np.float64)
    k = blobs.num_classes
    class_sums = x.T @ np.eye(k)[blobs.labels]
    # W₁ = −lr·Σ x (1/K − e_y)ᵀ / n = lr·(class sums − (Σx)/K)/n: class sums up to a class-independent shift.
    expected = 2.0 * (class_sums - x.sum(axis=0, keepdims=True).T / k) / len(x)
    np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.argmax(x @ weights, 1), np.argmax(x @ class_sums, 1))


def test_dp_newton_first_step_is_least_squares_up_to_a_class_independent_term(blobs):
    lam = 0.5
    weights, _ = run_recorded("dp-newton", {"lam": lam}, blobs, noise_scale=0.0)
    x = normalized(blobs).astype(np.float64)
    y = np.eye(blobs.num_classes)[blobs.labels]
    a = x.T @ x
    # At W = 0: H_c = A/4 and g_c = Σx/2 − B_c, so w_c = 4 (A + 4λ)⁻¹ (B_c − Σx/2).
    least_squares = 4 * np.linalg.solve(a + 4 * lam * np.eye(len(a)), x.T @ y)
    shift = weights - least_squares
    np.testing.assert_allclose(shift, shift[:, :1] @ np.ones((1, shift.shape[1])), atol=1e-6)
    np.testing.assert_allclose(
        shift[:, 0], -4 * np.linalg.solve(a + 4 * lam * np.eye(len(a)), x.sum(0) / 2), rtol=1e-5
    )


def test_dp_fc_without_noise_converges_to_the_logistic_solution():
    x, y = make_blobs(n=400, d=6, k=3, seed=3, spread=1.5)
    source = ArraySource(x, y, 3)
    z = Preprocessing()(x).astype(np.float64)
    reference = LogisticRegression(C=1e4, fit_intercept=False, tol=1e-10, max_iter=5000).fit(z, y)
    reference_probs = reference.predict_proba(z)

    def gap(steps):
        weights, _ = run_recorded(
            "dp-fc", {"steps": steps, "lam": 1e-3, "grad_clip": 10.0, "lr": 1.0}, source, noise_scale=0.0
        )
        logits = z @ weights
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        return np.abs(probs - reference_probs).max()

    gaps = [gap(steps) for steps in (5, 50, 400)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.02, gaps


@pytest.mark.parametrize("name", ["ridge", "logreg"])
def test_non_private_references_match_numpy_and_sklearn(name, blobs):
    from featdp.training import fit

    result = fit(blobs, name, hyperparameters={"lam": 2.0} if name == "ridge" else {"l2": 1.0})
    x = normalized(blobs).astype(np.float64)
    if name == "ridge":
        expected = np.linalg.solve(x.T @ x + 2.0 * np.eye(x.shape[1]), x.T @ np.eye(4)[blobs.labels])
        np.testing.assert_allclose(result.weights, expected, rtol=1e-4, atol=1e-6)
    else:
        # sklearn minimizes ½‖W‖² + C·Σ loss, i.e. our l2 = 1/C.
        reference = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-10, max_iter=5000).fit(x, blobs.labels)
        np.testing.assert_allclose(result.weights, reference.coef_.T, rtol=1e-3, atol=1e-3)


def test_large_dimension_solve_in_float32_matches_float64():
    """From d = 1024 the PSD solve decomposes in float32; it must agree with float64 to well below noise."""
    import scipy.linalg

    from featdp import linalg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 1100))
    matrix = x.T @ x + rng.normal(size=(1100, 1100)) * 5.0
    matrix = (matrix + matrix.T) / 2
    rhs = rng.normal(size=(1100, 7))
    lam = 50.0
    values, vectors = scipy.linalg.eigh(matrix)
    exact = vectors @ ((vectors.T @ rhs) / (np.maximum(values, 0) + lam)[:, None])
    np.testing.assert_allclose(linalg.psd_ridge_solve(matrix, lam, rhs), exact, rtol=1e-3, atol=1e-5 * np.abs(exact).max())
