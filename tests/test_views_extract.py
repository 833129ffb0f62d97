"""`featdp extract --views N` (featdp.extraction.augment, loading, extract, sharded): the augmentations, the
view rows the extraction writes, their provenance, resuming, sharding and bad options."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from featdp.extraction.augment import Augmentation, augment_view, max_shift_for, view_rng
from featdp.extraction.backbones.pil_preprocessing import center_crop_resize
from featdp.extraction.datasets import open_dataset
from featdp.extraction.extract import ExtractConfig, extract
from featdp.extraction.loading import LoadBatch
from featdp.featurefile import FeatureFile, FeatureFileError
from featdp_cli.main import app

from test_extract import BACKBONE, make_folder

pytest.importorskip("kymatio")
V = 3


def _image(size=28, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def _find_transform(image, view, max_shift):
    """(flip, dy, dx) with |dy|, |dx| <= max_shift that maps `image` to `view`, or None."""
    padded = {flip: np.pad(image[:, ::-1] if flip else image, [(max_shift,) * 2] * 2 + [(0, 0)], mode="reflect")
              for flip in (False, True)}
    size = image.shape[0]
    for flip in (False, True):
        for dy in range(-max_shift, max_shift + 1):
            for dx in range(-max_shift, max_shift + 1):
                crop = padded[flip][max_shift + dy : max_shift + dy + size, max_shift + dx : max_shift + dx + size]
                if np.array_equal(crop, view):
                    return flip, dy, dx
    return None


# --- the augmentations ---------------------------------------------------------------------------------------------


def test_max_shift_is_an_eighth_of_the_image_rounded_half_up_and_at_least_one():
    assert [max_shift_for(r) for r in (1, 8, 20, 28, 32, 224, 518)] == [1, 1, 3, 4, 4, 28, 65]
    with pytest.raises(ValueError, match="image_size=0"):
        max_shift_for(0)


def test_view_0_is_the_image_and_other_views_are_reproducible_functions_of_seed_split_content_view():
    image = _image()
    assert augment_view(image, 0, seed=1, split="train", max_shift=4) is image
    first = augment_view(image, 2, seed=1, split="train", max_shift=4)
    assert first.shape == image.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(augment_view(image.copy(), 2, seed=1, split="train", max_shift=4), first)
    key = dict(seed=1, split="train", image=image, view=2)
    draws = view_rng(**key).random(4)
    other_image = image.copy()
    other_image[0, 0, 0] ^= 1
    for name, other in (("seed", 2), ("split", "test"), ("image", other_image), ("view", 3)):
        assert not np.array_equal(view_rng(**{**key, name: other}).random(4), draws), name


def test_an_examples_views_do_not_depend_on_its_position_in_the_source(folder):
    # Neighbouring source datasets (one image added or removed) must give feature files that differ in that
    # example only: the views of every other image stay the same wherever it sits.
    from featdp.extraction.backbones.registry import load_backbone

    dataset, prepare = open_dataset(f"folder:{folder}"), load_backbone(BACKBONE).prepare
    augmentation = Augmentation(V, 0, max_shift_for(28))
    batch = LoadBatch(dataset, "train", prepare, augmentation)(np.array([4, 5]))
    shifted = LoadBatch(dataset, "train", prepare, augmentation)(np.array([5, 4]))
    np.testing.assert_array_equal(batch["image"][:V], shifted["image"][V:])


def test_views_are_flips_and_shifts_bounded_by_max_shift_covering_both_ends():
    image = np.arange(28 * 28 * 3, dtype=np.int64).reshape(28, 28, 3)  # every pixel distinct: the transform is unique
    found = [_find_transform(image, augment_view(image, v, seed=i, split="train", max_shift=4), 4)
             for i in range(60) for v in (1, 2)]
    assert None not in found  # never a shift beyond 4 pixels, never anything but a flip and a shift
    flips = [flip for flip, _, _ in found]
    shifts = {shift for _, dy, dx in found for shift in (dy, dx)}
    assert 0.3 < np.mean(flips) < 0.7  # p = 1/2: flipped for some draws, not for others
    assert shifts == set(range(-4, 5))  # uniform over [-4, 4]: both ends reached in 240 draws


@pytest.mark.parametrize("size, channels", [(28, 3), (28, 1), (224, 3)])
def test_prepared_images_of_the_backbones_keep_their_shape(size, channels):
    """ScatterNet's prepare gives 28×28×3 (gray replicated); the ViT/CLIP/DINOv2 family 224×224×3."""
    source = _image(37, channels, seed=3)[..., 0] if channels == 1 else _image(37, channels, seed=3)
    prepared = center_crop_resize(source, size)
    shift = max_shift_for(size)
    views = Augmentation(4, 0, shift).views_for(prepared, "train")
    assert views.shape == (4, size, size, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[0], prepared)
    assert all(_find_transform(prepared, views[v], shift) is not None for v in (1, 2, 3))


def test_augmentation_describes_itself_and_refuses_bad_values():
    assert Augmentation(4, 9, 28).describe() == {"views": 4, "splits": ["train"], "seed": 9, "flip": 0.5,
                                                 "max_shift": 28, "padding": "reflect",
                                                 "draws": "seed, split, image content, view"}
    assert Augmentation(4, 9, 28).views_of("test") == 1
    for bad in (dict(views=0), dict(seed=-1), dict(max_shift=-2), dict(views=True)):
        args = {"views": 2, "seed": 0, "max_shift": 1, **bad}
        name, value = next(iter(bad.items()))
        with pytest.raises(ValueError, match=rf"{name}={value!r}"):
            Augmentation(**args)


# --- extraction ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images") / "data", per_class=(4, 2))  # 12 train, 6 test


def _config(folder, out, **more):
    """Batches of 6 images: 2 examples of 3 views, 6 of one."""
    return ExtractConfig(**{"backbone": BACKBONE, "dataset": f"folder:{folder}", "out": out, "batch_size": 6,
                            "workers": 1, **more})


@pytest.fixture(scope="module")
def extracted(folder, tmp_path_factory):
    """(one-view file, 3-view file) of the same folder."""
    root = tmp_path_factory.mktemp("extracted")
    return extract(_config(folder, root / "one.h5")), extract(_config(folder, root / "three.h5", views=V))


def _stored(path, split):
    """(features, labels, index, views) of a split; float16 features become float32 exactly, so equal
    arrays mean bitwise equal rows."""
    with FeatureFile(path) as handle:
        s = handle.split(split)
        return (*s.read(), s.read_index(), s.views_per_example)


def test_loaded_batches_hold_the_views_of_each_example_example_major(folder):
    from featdp.extraction.backbones.registry import load_backbone

    dataset, prepare = open_dataset(f"folder:{folder}"), load_backbone(BACKBONE).prepare
    augmentation = Augmentation(V, 0, max_shift_for(28))
    batch = LoadBatch(dataset, "train", prepare, augmentation)(np.array([4, 5]))
    assert batch["image"].shape == (2 * V, 28, 28, 3)
    np.testing.assert_array_equal(batch["index"], [4, 4, 4, 5, 5, 5])
    np.testing.assert_array_equal(batch["label"], np.repeat([dataset.example("train", i)[1] for i in (4, 5)], V))
    np.testing.assert_array_equal(batch["image"][V:], augmentation.views_for(prepare(dataset.example("train", 5)[0]),
                                                                            "train"))
    assert LoadBatch(dataset, "test", prepare, augmentation)(np.array([4, 5]))["image"].shape == (2, 28, 28, 3)


def test_a_3_view_file_holds_3_rows_per_train_example_and_view_0_is_the_one_view_row(extracted):
    one, three = extracted
    x1, y1, i1, v1 = _stored(one, "train")
    x3, y3, i3, v3 = _stored(three, "train")
    assert (v1, v3) == (1, V) and x3.shape == (12 * V, x1.shape[1])
    np.testing.assert_array_equal(y3, np.repeat(y1, V))
    np.testing.assert_array_equal(i3, np.repeat(np.arange(12), V))
    np.testing.assert_array_equal(x3[0::V], x1)  # bitwise, as stored: view 0 is the unaugmented image
    for v in (1, 2):
        differs = np.any(x3[v::V] != x1, axis=1)
        assert differs.mean() >= 0.9, (v, differs)
    assert not np.array_equal(x3[1::V], x3[2::V])
    for a, b in zip(_stored(one, "test"), _stored(three, "test")):  # the test split: one view, as before
        np.testing.assert_array_equal(a, b)


def test_view_rows_are_the_backbone_applied_to_the_augmented_images(folder, extracted):
    from featdp.extraction.backbones.registry import load_backbone

    _, three = extracted
    backbone, dataset = load_backbone(BACKBONE), open_dataset(f"folder:{folder}")
    augmentation = Augmentation(V, 0, max_shift_for(backbone.image_size))
    images = np.concatenate([augmentation.views_for(backbone.prepare(dataset.example("train", i)[0]), "train")
                             for i in range(3)])
    expected = np.asarray(jax.jit(backbone.apply)({}, images))
    np.testing.assert_allclose(_stored(three, "train")[0][: 3 * V], expected, rtol=2e-3, atol=2e-3)


def test_the_augmentation_is_recorded_and_a_one_view_file_records_none(extracted):
    one, three = extracted
    with FeatureFile(one) as a, FeatureFile(three) as b:
        assert "augmentation" not in a.metadata.preprocessing
        assert b.metadata.preprocessing["augmentation"] == {"views": V, "splits": ["train"], "seed": 0, "flip": 0.5,
                                                            "max_shift": 4, "padding": "reflect",
                                                            "draws": "seed, split, image content, view"}
        rest = {k: v for k, v in b.metadata.preprocessing.items() if k != "augmentation"}
        assert rest == a.metadata.preprocessing


class _Stop(Exception):
    pass


def test_an_interrupted_view_extraction_resumes_to_the_uninterrupted_file(folder, extracted, tmp_path):
    _, reference = extracted
    out = tmp_path / "resumed.h5"

    def stop_at(rows):
        def progress(update):
            if update.split == "train" and update.rows_done >= rows:
                raise _Stop
        return progress

    with pytest.raises(_Stop):  # after the first batch: 2 examples of 3 views
        extract(_config(folder, out, views=V), on_progress=stop_at(2 * V))
    with FeatureFile(out) as handle:
        assert handle.split("train", require_complete=False).rows_done == 2 * V
    with pytest.raises(_Stop):  # a resumed run stopped again, mid-split
        extract(_config(folder, out, views=V), on_progress=stop_at(6 * V))
    extract(_config(folder, out, views=V))
    for split in ("train", "test"):
        for a, b in zip(_stored(reference, split), _stored(out, split)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("change", [dict(views=2), dict(augment_seed=1), dict(views=1)])
def test_resuming_with_other_views_or_another_seed_is_refused(folder, tmp_path, change):
    out = tmp_path / "f.h5"
    extract(_config(folder, out, views=V, limit=2))
    with pytest.raises(FeatureFileError, match=r"cannot resume: attribute 'preprocessing' differs"):
        extract(_config(folder, out, **{"views": V, "limit": 2, **change}))
    extract(_config(folder, out, views=V, limit=2))  # the same command: already complete


def test_a_batch_smaller_than_the_views_holds_one_whole_example(folder, extracted, tmp_path):
    _, reference = extracted
    out = extract(_config(folder, tmp_path / "f.h5", views=V, limit=4, splits=("train",), batch_size=2))
    x, y, index, views = _stored(out, "train")
    assert views == V and len(y) == 4 * V
    np.testing.assert_array_equal(index, np.repeat(np.arange(4), V))
    # Other batch shapes run other compiled programs: equal to float16 precision, not necessarily bitwise.
    np.testing.assert_allclose(x, _stored(reference, "train")[0][: 4 * V], rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("args, fragment", [
    (["--views", "0"], "views must be an integer in [1, 64] (1: no augmentation), got 0"),
    (["--views", "65"], "got 65"),
    (["--views", "3", "--splits", "test"], "views=3 augments the split named 'train', but the splits extracted are "
                                           "'test'"),
    (["--augment-seed", "-1"], "augment seed must be an integer >= 0, got -1"),
    (["--augment-shift", "-2"], "augment shift must be an integer >= 0 (pixels), got -2"),
    (["--augment-shift", "2"], "the augment seed, shift and flip options shape augmented views: they need views > 1"),
    (["--no-augment-flip"], "they need views > 1 (--views N)"),
])
def test_bad_view_options_are_one_error_line_exit_2_and_no_file(folder, tmp_path, args, fragment):
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}", "--out",
                                      str(out), "--workers", "1", *args])
    assert result.exit_code == 2 and result.output.startswith("error:"), result.output
    assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []  # no file, no lock file


def test_cli_views_are_written_and_shown_by_info(folder, tmp_path):
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(app, ["extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}", "--out",
                                      str(out), "--workers", "1", "--limit", "3", "--views", "2", "--augment-seed",
                                      "5"])
    assert result.exit_code == 0, result.output
    with FeatureFile(out) as handle:
        assert handle.split("train").views_per_example == 2
        assert handle.metadata.preprocessing["augmentation"]["seed"] == 5
    result = CliRunner().invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    train = next(line for line in result.output.splitlines() if " train " in line)
    assert "3 (6 rows)" in train and " 2 " in train, result.output


def test_a_2_process_view_extraction_equals_the_1_process_one(folder, extracted, tmp_path):
    from featdp import featurefile_parts as parts
    from test_distributed import CLI, free_port, group_flags, run_all

    _, reference = extracted
    out, port = tmp_path / "many.h5", free_port()
    command = [*CLI, "extract", "--backbone", BACKBONE, "--dataset", f"folder:{folder}", "--out", str(out),
               "--batch-size", "6", "--workers", "1", "--views", str(V)]
    results = run_all([command + group_flags(port, 2, i) for i in range(2)])
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    with FeatureFile(out) as handle:
        assert handle.sharded and handle.split("train").views_per_example == V
    for split in ("train", "test"):
        for a, b in zip(_stored(reference, split), _stored(out, split)):
            np.testing.assert_array_equal(a, b)
    with FeatureFile(parts.part_path(out, 1, 2)) as part:  # process 1: examples 6..11, rows 18..35
        np.testing.assert_array_equal(part.split("train").read_index(), np.repeat(np.arange(6, 12), V))


def test_flips_off_and_no_shift_leave_every_view_the_image_and_flips_off_alone_changes_only_flips():
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    same = Augmentation(4, 0, 0, flip=False).views_for(image, "train")
    assert all(np.array_equal(view, image) for view in same)
    flipping = Augmentation(8, 0, 0).views_for(image, "train")
    assert any(np.array_equal(view, image[:, ::-1]) for view in flipping[1:])
    # Without flips, a view is the flipping augmentation's view with the same shift and no flip.
    distinct = np.arange(12 * 12 * 3, dtype=np.int64).reshape(12, 12, 3)  # every pixel distinct: one transform
    shifted, shifted_flipping = Augmentation(8, 0, 2, flip=False), Augmentation(8, 0, 2)
    transforms = [_find_transform(distinct, view, 2) for view in shifted.views_for(distinct, "train")[1:]]
    flipping = [_find_transform(distinct, view, 2) for view in shifted_flipping.views_for(distinct, "train")[1:]]
    assert all(t is not None and not t[0] for t in transforms)
    assert [t[1:] for t in transforms] == [t[1:] for t in flipping] and any(t[0] for t in flipping)
    assert shifted.describe()["flip"] == 0.0 and shifted_flipping.describe()["flip"] == 0.5
    assert shifted.describe()["max_shift"] == 2
