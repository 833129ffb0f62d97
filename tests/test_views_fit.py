"""Stage two on several views per example (augmentation multiplicity): each example counts as the average
of its views, so sensitivities, the released count, Poisson sampling and hold-out splits are per example."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FULL_BATCH_VARIANTS, assert_close, invoke, make_blobs, run_recorded, variant_id
from featdp import selection
from featdp.backend import NumpyBackend, ViewAveraging
from featdp.bench import tuning
from featdp.data import (
    ArraySource, DataError, Preprocessing, RowSubset, TrainingData, aligned_block_rows, example_count,
    maybe_in_memory,
)
from featdp.mechanism import Releaser, make_key
from featdp.training import fit
from test_sensitivity import release_change


def views_of(features: np.ndarray, views: int, seed: int = 0, jitter: float = 0.3) -> np.ndarray:
    """(n, V, d): view 0 the features themselves, the others perturbed copies (stand-ins for augmentations)."""
    rng = np.random.default_rng(seed)
    stacked = np.repeat(features[:, None, :], views, axis=1)
    stacked[:, 1:] += jitter * rng.normal(size=stacked[:, 1:].shape)
    return stacked.astype(np.float32)


# --------------------------------------------------------------------------------------------- sources


def test_three_dimensional_features_are_example_major_views():
    x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    source = ArraySource(x, np.array([1, 0]), 2)
    assert source.views_per_example == 3 and source.num_examples == 6 and example_count(source) == 2
    np.testing.assert_array_equal(source.features[3], x[1, 0])
    np.testing.assert_array_equal(source.labels, [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_views_must_be_a_positive_integer(bad):
    with pytest.raises(DataError, match="views_per_example"):
        ArraySource(np.zeros((4, 2)), np.zeros(4, int), 2, views_per_example=bad)


def test_rows_that_are_not_whole_examples_are_refused():
    with pytest.raises(DataError, match="not whole examples of 3 views"):
        ArraySource(np.zeros((4, 2)), np.zeros(4, int), 2, views_per_example=3)
    with pytest.raises(DataError, match=r"rows \[2, 4\) do not share one label"):
        ArraySource(np.zeros((4, 2)), np.array([0, 0, 0, 1]), 2, views_per_example=2)


def test_a_subset_keeps_or_drops_whole_examples():
    source = ArraySource(np.ones((3, 2, 4)), np.array([0, 1, 0]), 2)
    assert RowSubset(source, np.array([True, True, False, False, True, True])).views_per_example == 2
    with pytest.raises(DataError, match="all 2 views of each example together"):
        RowSubset(source, np.array([True, False, True, True, False, False]))


def test_in_memory_copy_keeps_the_views():
    source = ArraySource(np.ones((3, 2, 4)), np.array([0, 1, 0]), 2)
    subset = RowSubset(source, np.repeat([True, False, True], 2))
    assert maybe_in_memory(subset) is subset
    copied = maybe_in_memory(_Streamed(source))
    assert copied.views_per_example == 2 and copied.num_examples == 6


class _Streamed:
    """A non-array source with views (as a file's split is)."""

    def __init__(self, source):
        self._source = source
        self.num_examples, self.feature_dim = source.num_examples, source.feature_dim
        self.num_classes, self.views_per_example = source.num_classes, source.views_per_example

    def blocks(self, block_rows=4):
        return self._source.blocks(block_rows)


def test_blocks_hold_whole_examples():
    assert aligned_block_rows(32768, 3) == 32766 and aligned_block_rows(2, 3) == 3
    source = ArraySource(np.ones((10, 3, 2)), np.zeros(10, int), 2)
    data = TrainingData(source, Preprocessing(), block_rows=8)
    assert data.block_rows == 6 and isinstance(data.backend, ViewAveraging)
    one_view = TrainingData(ArraySource(np.ones((10, 2)), np.zeros(10, int), 2), Preprocessing(), block_rows=8)
    assert one_view.block_rows == 8 and isinstance(one_view.backend, NumpyBackend)


# ------------------------------------------------------------------------------------- what is summed


def test_identical_views_give_the_one_view_statistics():
    x, y = make_blobs(n=90, d=6, k=3, seed=1)
    one = TrainingData(ArraySource(x, y, 3), Preprocessing())
    many = TrainingData(ArraySource(np.repeat(x[:, None], 4, axis=1), y, 3), Preprocessing())
    # Equal up to float32 rounding within a block (the repeated rows are summed in another order).
    for a, b in zip(one.backend.second_moments(one), many.backend.second_moments(many)):
        assert_close(b, a, rtol=1e-5)
    weights = np.random.default_rng(0).normal(size=(6, 3))
    assert_close(many.backend.clipped_gradient_sum(many, weights, 0.3),
                 one.backend.clipped_gradient_sum(one, weights, 0.3), rtol=1e-5)
    for a, b in zip(one.backend.newton_statistics(one, weights), many.backend.newton_statistics(many, weights)):
        assert_close(b, a, rtol=1e-5)


def test_gradient_sum_is_over_examples_of_their_views_average():
    x, y = make_blobs(n=40, d=5, k=3, seed=2)
    stacked = views_of(x, 3)
    data = TrainingData(ArraySource(stacked, y, 3), Preprocessing(clip_norm=2.0))
    weights = np.random.default_rng(1).normal(size=(5, 3))
    clip = 0.4
    expected = np.zeros((5, 3))
    for i in range(len(y)):
        per_view = []
        for v in range(3):
            row = Preprocessing(clip_norm=2.0)(stacked[i, v][None])[0].astype(np.float64)
            logits = row @ weights
            p = np.exp(logits - logits.max())
            p /= p.sum()
            p[y[i]] -= 1
            g = np.outer(row, p)
            per_view.append(g * min(1.0, clip / max(np.linalg.norm(g), 1e-30)))
        expected += np.mean(per_view, axis=0)
    np.testing.assert_allclose(data.backend.clipped_gradient_sum(data, weights, clip), expected, rtol=1e-4, atol=1e-5)


def test_poisson_sampling_keeps_or_drops_an_example_with_all_its_views():
    x, y = make_blobs(n=50, d=4, k=2, seed=3)
    stacked = views_of(x, 2)
    data = TrainingData(ArraySource(stacked, y, 2), Preprocessing(), block_rows=30)
    releaser = Releaser(make_key(7))
    asked = []

    def select(block, examples):
        mask = releaser.poisson_mask(0, block, examples, 0.4)
        asked.append((block, examples, mask))
        return mask

    weights = np.zeros((4, 2))
    total = data.backend.clipped_gradient_sum(data, weights, 10.0, select)
    assert [(b, e) for b, e, _ in asked] == [(0, 15), (1, 15), (2, 15), (3, 5)]  # examples per block, not rows
    kept = np.concatenate([m for _, _, m in asked])
    assert 0 < kept.sum() < 50
    chosen = TrainingData(ArraySource(stacked[kept], y[kept], 2), Preprocessing())
    np.testing.assert_allclose(total, chosen.backend.clipped_gradient_sum(chosen, weights, 10.0), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- privacy


@st.composite
def neighbouring_view_datasets(draw):
    n = draw(st.integers(3, 20))
    views = draw(st.integers(2, 4))
    d = draw(st.integers(1, 5))
    k = draw(st.integers(2, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.01, 1.0, 100.0]))
    x = (rng.normal(size=(n + 1, views, d)) * scale * rng.exponential(size=(n + 1, views, 1))).astype(np.float32)
    y = rng.integers(0, k, size=n + 1)
    keep = np.arange(n + 1) != draw(st.integers(0, n))
    return ArraySource(x[keep], y[keep], k), ArraySource(x, y, k)


@pytest.mark.parametrize("variant", FULL_BATCH_VARIANTS, ids=variant_id)
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(datasets=neighbouring_view_datasets())
def test_removing_an_example_and_all_its_views_moves_each_release_at_most_its_sensitivity(variant, datasets):
    name, hp = variant
    hp = {**hp, "clip_norm": 0.7}
    smaller, larger = datasets
    public = example_count(smaller)
    _, first = run_recorded(name, hp, smaller, noise_scale=1.0, seed=3, public_count=public)
    _, second = run_recorded(name, hp, larger, noise_scale=1.0, seed=3, replay=first.released, public_count=public)
    for record, a, b in zip(first.releases, first.clean, second.clean):
        assert release_change(record, a, b) <= record.sensitivity * (1 + 1e-5) + 1e-6, record


def test_the_released_count_counts_examples_not_views():
    x, y = make_blobs(n=400, d=6, k=3, seed=4)
    result = fit(ArraySource(views_of(x, 4), y, 3), "dp-ls", epsilon=8.0, delta=1e-6, seed=0)
    assert result.num_examples == 400
    # The count's noise std is about 50 here: ñ is near n = 400, never near the 1600 rows.
    assert abs(result.count.value - 400) < 250


def test_views_fit_and_tune_end_to_end():
    x, y = make_blobs(n=600, d=8, k=3, seed=5)
    train = ArraySource(views_of(x, 3), y, 3)
    head = fit(train, "dp-fc", epsilon=3.0, delta=1e-5, seed=1)
    assert head.accuracy(ArraySource(x, y, 3)) > 0.8
    tuned = selection.select(train, ["dp-ls"], epsilon=3.0, delta=1e-5, seed=2, mean_runs=2)
    assert tuned.num_examples == 600


def test_selection_parts_and_the_score_are_per_example():
    x, y = make_blobs(n=300, d=5, k=3, seed=6)
    train = ArraySource(views_of(x, 4), y, 3)
    fit_part, validation = selection.split_parts(train)
    assert fit_part.views_per_example == validation.views_per_example == 4  # masks checked whole-example
    assert 0 < example_count(validation) < 300
    # One view decides: the parts equal those of the first views alone.
    _, first_views = selection.split_parts(ArraySource(train.features[::4], y, 3))
    np.testing.assert_array_equal(validation.mask[::4], first_views.mask)
    # The score counts an example as the fraction of its views predicted right: at most 1 per example.
    method = selection.get_method("dp-ls")
    weights = np.random.default_rng(0).normal(size=(5, 3))
    correct = selection._correct(method, weights, validation)
    assert correct <= example_count(validation) and correct * 4 == pytest.approx(round(correct * 4))


def test_bench_holdout_keeps_examples_whole():
    x, y = make_blobs(n=100, d=4, k=2, seed=7)
    train = ArraySource(views_of(x, 3), y, 2)
    fit_part, held = tuning.split_holdout(train, 0.2)
    assert example_count(held) == 20 and example_count(fit_part) == 80


def test_a_streamed_split_fits_the_head_the_in_memory_split_fits(tmp_path, monkeypatch):
    from featdp.featurefile import FeatureFile, Split, write_features

    loads = []
    read = Split.read
    monkeypatch.setattr(Split, "read", lambda self, *a, **k: loads.append(self.name) or read(self, *a, **k))
    x, y = make_blobs(n=300, d=6, k=3, seed=8)
    path = write_features(tmp_path / "f.h5", {"train": (x, y), "test": (x[:50], y[:50])})
    with FeatureFile(path) as features:
        split = features.split("train")
        held = fit(split, "dp-fc", epsilon=1.0, delta=1e-5, seed=4)
        assert loads == ["train"]  # the default budget holds it in memory
        streamed = fit(split, "dp-fc", epsilon=1.0, delta=1e-5, seed=4, memory_budget_bytes=0)
        assert loads == ["train"]  # a zero budget streams it: never loaded whole
    # The same noise; sums over rows in memory run in other chunks (featdp.host_gradients): float rounding only.
    assert_close(streamed.weights, held.weights, rtol=1e-5)
    result = invoke("fit", path, "--eps", "1", "--memory-gib", "-1", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "--memory-gib must be a finite number ≥ 0, got -1" in result.output
    assert not (tmp_path / "o").exists()


def test_reports_name_the_views_an_example_is_made_of():
    from featdp.report import privacy_report

    x, y = make_blobs(n=300, d=5, k=3, seed=9)
    result = fit(ArraySource(views_of(x, 3), y, 3), "dp-ls", epsilon=2.0, delta=1e-5, seed=0)
    assert "an example is its 3 views" in privacy_report(result)["neighboring_relation"]
    one = fit(ArraySource(x, y, 3), "dp-ls", epsilon=2.0, delta=1e-5, seed=0)
    assert "views" not in privacy_report(one)["neighboring_relation"]
    tuned = selection.select(ArraySource(views_of(x, 3), y, 3), ["dp-ls"], epsilon=3.0, delta=1e-5, seed=2,
                             mean_runs=2)
    assert "an example is its 3 views" in selection.selection_report(tuned)["neighboring_relation"]


def test_ridge_counts_examples_not_views_in_its_default_ridge():
    x, y = make_blobs(n=200, d=5, k=3, seed=10)
    one = fit(ArraySource(x, y, 3), "ridge")
    many = fit(ArraySource(np.repeat(x[:, None], 4, axis=1), y, 3), "ridge")
    assert_close(many.weights, one.weights, rtol=1e-4)
