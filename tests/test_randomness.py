"""Keys and bits: full-width keys from the OS or from a whole seed, independent child keys, exact Bernoulli."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import scipy.stats
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from featdp import mechanism, randomness
from featdp.randomness import RootKey, bernoulli, make_key
from featdp.training import fit


def noise_of(key: RootKey) -> np.ndarray:
    releaser = mechanism.Releaser(key)
    return releaser.release("g", np.zeros(64), sensitivity=1.0, noise_multiplier=1.0)


@pytest.mark.parametrize("high_bit", [32, 63, 64, 200])
def test_seeds_that_differ_only_in_high_bits_give_different_noise(high_bit):
    """A 63-bit seed squeezed into a 32-bit key made seed 5 and seed 5 + 2^32 identical; seeds are hashed
    whole now."""
    low, high = 5, 5 + 2**high_bit
    assert make_key(low).material != make_key(high).material
    assert not np.allclose(noise_of(make_key(low)), noise_of(make_key(high)))
    np.testing.assert_array_equal(noise_of(make_key(high)), noise_of(make_key(high)))


def test_a_fit_seeded_above_bit_32_differs_from_its_low_bits(blobs):
    low = fit(blobs, "dp-sgd", epsilon=1.0, delta=1e-5, seed=5)
    high = fit(blobs, "dp-sgd", epsilon=1.0, delta=1e-5, seed=4294967301)  # 5 + 2^32
    assert not np.allclose(low.weights, high.weights)


def test_the_root_key_is_the_bytes_the_os_gave(monkeypatch):
    given = bytes(range(32))
    calls = []

    def token_bytes(count):
        calls.append(count)
        return given

    monkeypatch.setattr(randomness.secrets, "token_bytes", token_bytes)
    key = make_key(None)
    assert calls == [32] and key.material == given and not key.seeded
    # Every noise bit is AES-256-CTR under keys derived from those bytes, and nothing else.
    np.testing.assert_array_equal(noise_of(key), noise_of(RootKey(given)))
    child = key.child("noise", 0).child(0)
    expected_first_block = Cipher(algorithms.AES(child.material), modes.ECB()).encryptor().update(bytes(16))
    assert child.stream().words(2).tobytes() == expected_first_block


def test_seed_keys_are_sha256_of_the_whole_seed_and_children_are_distinct():
    seed = 2**300 + 12345
    assert make_key(seed).material == hashlib.sha256(b"featdp seed v1:" + str(seed).encode()).digest()
    root = make_key(0)
    children = {root.child(i).material for i in range(100)} | {root.child("noise", 1).material}
    assert len(children) == 101 and root.material not in children
    assert "material" not in repr(root) and root.material.hex() not in repr(root)
    with pytest.raises(TypeError):
        make_key(1.5)


@pytest.mark.parametrize("q", [8192 / 60000, 0.5, 0.999, 1e-3])
def test_bernoulli_has_the_exact_rate(q):
    draws = bernoulli(make_key(1).stream(), q, 400_000)
    assert scipy.stats.binomtest(int(draws.sum()), draws.size, q).pvalue > 1e-4


class _Words:
    """A stream that returns given words, to drive `bernoulli` through its tie-breaking path."""

    def __init__(self, *batches):
        self._batches = [np.asarray(b, np.uint64) for b in batches]

    def words(self, count):
        batch = self._batches.pop(0)
        assert batch.size == count
        return batch


def test_bernoulli_breaks_ties_word_by_word_exactly():
    q = 2.0**-20 + 2.0**-72  # an exact float whose binary expansion needs two 64-bit words
    first, second = 2**44, 2**56  # q·2^64 = 2^44 + 2^-8: first word 2^44, second word 2^-8·2^64
    # Of three draws: below, tie, above q's first word; the tie is then decided by the second word.
    assert list(bernoulli(_Words([first - 1, first, first + 1], [0]), q, 3)) == [True, True, False]
    assert list(bernoulli(_Words([first], [second]), q, 1)) == [False]  # u == q exactly: not below
    assert list(bernoulli(_Words([first], [second - 1]), q, 1)) == [True]
    assert bernoulli(make_key(0).stream(), 2.0**-80, 100_000).sum() == 0
    assert bernoulli(make_key(0).stream(), 1.0, 10).all() and not bernoulli(make_key(0).stream(), 0.0, 10).any()
