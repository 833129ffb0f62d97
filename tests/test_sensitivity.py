"""On random neighbouring datasets, no released statistic moves by more than its declared sensitivity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FULL_BATCH_VARIANTS, run_recorded, variant_id
from featdp.data import ArraySource
from featdp.mechanism import upper_triangle_norm


def release_change(record, a, b) -> float:
    diff = a - b
    if record.symmetric:
        per_matrix = [upper_triangle_norm(m) for m in diff.reshape(-1, *diff.shape[-2:])]
        return float(np.sqrt(np.sum(np.square(per_matrix))))
    return float(np.linalg.norm(diff))


@st.composite
def neighbouring_datasets(draw):
    n = draw(st.integers(3, 30))
    d = draw(st.integers(1, 6))
    k = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n + 1, d)) * scale * rng.exponential(size=(n + 1, 1))).astype(np.float32)
    y = rng.integers(0, k, size=n + 1)
    where = draw(st.integers(0, n))  # the extra example may sit anywhere
    keep = np.arange(n + 1) != where
    return ArraySource(x[keep], y[keep], k), ArraySource(x, y, k)


@pytest.mark.parametrize("variant", FULL_BATCH_VARIANTS, ids=variant_id)
# derandomize: CI sees the same 40 draws every run (the property must hold for all of them; it did
# not before n was replaced by a replayed public count).
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datasets=neighbouring_datasets(), normalize=st.sampled_from(["unit", "clip"]))
def test_released_statistics_move_at_most_their_sensitivity(variant, datasets, normalize):
    name, hp = variant
    hp = {**hp, "normalize": normalize, "clip_norm": 0.7}
    smaller, larger = datasets
    # Both runs compute with one public count (a fit's released ñ), and the second replays the first's
    # outputs, so both see the same public state W_t at every step: only the data differ.
    public = smaller.num_examples
    _, first = run_recorded(name, hp, smaller, noise_scale=1.0, seed=3, public_count=public)
    _, second = run_recorded(name, hp, larger, noise_scale=1.0, seed=3, replay=first.released, public_count=public)
    assert [r.name for r in first.releases] == [r.name for r in second.releases]
    for record, a, b in zip(first.releases, first.clean, second.clean):
        assert release_change(record, a, b) <= record.sensitivity * (1 + 1e-5) + 1e-6, record
