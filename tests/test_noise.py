"""Noise: declared scale (Kolmogorov–Smirnov), and independence across classes, steps and entries."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.stats

from conftest import PRIVATE_VARIANTS, run_recorded, variant_id
from featdp import mechanism
from featdp.data import ArraySource

variants = pytest.mark.parametrize("variant", PRIVATE_VARIANTS, ids=variant_id)


def zero_features(n=200, d=64, k=16):
    labels = np.arange(n) % k
    return ArraySource(np.zeros((n, d), np.float32), labels, k)


def standardized_noise(releaser):
    """Each release's (released − clean) / (σΔ), upper triangles only for symmetric statistics."""
    out = []
    for record, clean, released in zip(releaser.releases, releaser.clean, releaser.released):
        noise = (released - clean) / record.noise_std
        if record.symmetric:
            rows, cols = np.triu_indices(noise.shape[-1])
            noise = noise[..., rows, cols]
        out.append(noise.ravel())
    return out


@variants
def test_with_zero_features_every_release_is_pure_noise_at_the_declared_scale(variant):
    name, hp = variant
    source = zero_features()
    _, releaser = run_recorded(name, hp, source, noise_scale=2.0, seed=11)
    for record, clean in zip(releaser.releases, releaser.clean):
        assert not np.any(clean), f"{record.name}: zero features must give a zero statistic"
    per_release = standardized_noise(releaser)
    for record, noise in zip(releaser.releases, per_release):
        # Each release on its own (≥ 1000 draws): its std within 10% of the declared one (> 4 standard errors).
        assert noise.size >= 1000 and abs(noise.std() - 1) < 0.1, (record, noise.std())
    samples = np.concatenate(per_release)
    assert scipy.stats.kstest(samples, "norm").pvalue > 1e-3
    for wrong in (0.5, 1.5):
        assert scipy.stats.kstest(samples / wrong, "norm").pvalue < 1e-6


@variants
def test_noise_differs_across_classes_steps_and_entries(variant):
    """A key reused across steps (e.g. captured as a constant inside a jit-compiled step) or one draw
    broadcast across classes gives identical noise somewhere; this fails then."""
    name, hp = variant
    _, releaser = run_recorded(name, hp, zero_features(), noise_scale=1.0, seed=5)
    noises = [released - clean for released, clean in zip(releaser.released, releaser.clean)]
    for record, noise in zip(releaser.releases, noises):
        flat = noise
        if record.symmetric:  # compare the independent entries only: the upper triangles
            rows, cols = np.triu_indices(noise.shape[-1])
            flat = noise[..., rows, cols]
        # float32 normals collide now and then; shared noise would repeat whole rows or columns.
        assert len(np.unique(flat)) >= 0.99 * flat.size, f"{record.name}: repeated noise entries"
        if noise.ndim == 2 and not record.symmetric:  # (d, K): one column per class
            assert np.linalg.matrix_rank(noise) == min(noise.shape), f"{record.name}: classes share noise"
        if noise.ndim == 3:  # a per-class stack
            assert not np.allclose(noise[0], noise[1]), f"{record.name}: classes share noise"
    by_name: dict[str, list[np.ndarray]] = {}
    for record, noise in zip(releaser.releases, noises):
        by_name.setdefault(record.name, []).append(noise)
    for release_name, draws in by_name.items():
        for i in range(len(draws)):
            for j in range(i + 1, len(draws)):
                assert not np.allclose(draws[i], draws[j]), f"{release_name}: steps {i} and {j} share noise"
                corr = np.corrcoef(draws[i].ravel(), draws[j].ravel())[0, 1]
                assert abs(corr) < 0.2, f"{release_name}: steps {i} and {j} correlated ({corr:.2f})"


def test_a_key_captured_in_jit_would_be_caught():
    """The bug in the DP-FC reference code, rebuilt: noise from a key baked into a jitted function
    repeats every step. The check above must reject such a releaser, and ours draws fresh noise."""
    frozen_key = jax.random.key(0)

    @jax.jit
    def buggy_noise(shape_holder):
        return jax.random.normal(frozen_key, shape_holder.shape)

    draws = [np.asarray(buggy_noise(np.zeros((5, 3)))) for _ in range(3)]
    assert np.allclose(draws[0], draws[1])  # what the test above looks for

    releaser = mechanism.Releaser(mechanism.make_key(0))
    fresh = [releaser.release("g", np.zeros((5, 3)), sensitivity=1.0, noise_multiplier=1.0) for _ in range(3)]
    assert not np.allclose(fresh[0], fresh[1]) and not np.allclose(fresh[1], fresh[2])


def test_symmetric_noise_is_mirrored_and_poisson_masks_have_the_rate():
    releaser = mechanism.Releaser(mechanism.make_key(1))
    noisy = releaser.release("a", np.zeros((30, 30)), sensitivity=2.0, noise_multiplier=1.5, symmetric=True)
    np.testing.assert_array_equal(noisy, noisy.T)
    upper = noisy[np.triu_indices(30)]
    assert scipy.stats.kstest(upper / releaser.releases[0].noise_std, "norm").pvalue > 1e-3
    masks = np.concatenate([releaser.poisson_mask(step, 0, 10_000, 0.2) for step in range(5)])
    assert scipy.stats.binomtest(int(masks.sum()), masks.size, 0.2).pvalue > 1e-4
    assert not np.array_equal(releaser.poisson_mask(0, 0, 100, 0.5), releaser.poisson_mask(1, 0, 100, 0.5))


def test_the_real_releaser_and_every_stand_in_implement_the_interface():
    from featdp.audit.recording import Recorder, Replay

    real = mechanism.Releaser(mechanism.make_key(0))
    for releaser in (real, Recorder(real), Replay([]), Replay([], masks=real)):
        assert isinstance(releaser, mechanism.ReleaserInterface), type(releaser).__name__
