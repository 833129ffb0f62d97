"""`hf:` datasets (featdp.extraction.datasets.hf_source), on datasets the tests write: saved with save_to_disk,
a local folder of Parquet files or images, and that folder's prepared copy read back as a Hub dataset from
the datasets cache, offline. Then extraction through the library and the CLI: rows, labels, class names,
provenance, resume refusal, and bad specs failing with one `error:` line."""

from __future__ import annotations

import concurrent.futures
import io
import json
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import invoke
from featdp.extraction.datasets import DatasetError, open_dataset

datasets = pytest.importorskip("datasets")

CLASSES = ("ant", "bee", "cat")
BACKBONE = "scatternet"  # weight-free, 28x28 gray: the cheapest backbone


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # No test reaches the Hub. `datasets` reads HF_HUB_OFFLINE once, when first imported, so the flag is set
    # on its config rather than in the environment.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _png(pixels: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    image = Image.fromarray(pixels)
    if palette is not None:
        image.putpalette(palette.tobytes())  # an L image of indices becomes a P image
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _rotated_jpeg(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: the camera was turned; the upright image is rotated 90° clockwise
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def make_examples(n: int, seed: int):
    """(image bytes, expected uint8 array, label): gray, RGB, RGBA and palette PNGs of several sizes, and JPEGs
    whose EXIF orientation turns them (expected: Pillow's upright decoding, lossy pixels and all)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        h, w = 6 + i % 4, 9 + i % 3
        label = int(rng.integers(0, len(CLASSES)))
        kind = i % 5
        if kind == 0:
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
            examples.append((_png(pixels), pixels, label))
        elif kind == 1:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            examples.append((_png(pixels), pixels, label))
        elif kind == 2:
            pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
            examples.append((_png(pixels), pixels[..., :3], label))
        elif kind == 3:
            indices = rng.integers(0, 8, (h, w), dtype=np.uint8)
            palette = rng.integers(0, 256, (8, 3), dtype=np.uint8)
            examples.append((_png(indices, palette), palette[indices], label))
        else:
            data = _rotated_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
            assert upright.shape == (w, h, 3)
            examples.append((data, upright, label))
    return examples


FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})


def make_split(examples, features=FEATURES, image="image", label="label"):
    return datasets.Dataset.from_dict(
        {image: [{"bytes": data, "path": None} for data, _, _ in examples], label: [y for _, _, y in examples]},
        features=features,
    )


@pytest.fixture(scope="module")
def examples():
    return {"train": make_examples(7, seed=0), "test": make_examples(4, seed=1)}


def save(path, examples, **kwargs):
    datasets.DatasetDict({split: make_split(e, **kwargs) for split, e in examples.items()}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory, examples):
    return save(tmp_path_factory.mktemp("hf") / "saved", examples)


def check_examples(dataset, examples):
    """Every example: the pixels and label written; the same in any order, in threads, and after pickling (as
    loader workers receive the source)."""
    assert dataset.splits == {split: len(e) for split, e in examples.items()}
    assert dataset.class_names == CLASSES
    for split, split_examples in examples.items():
        read = [dataset.example(split, i) for i in range(len(split_examples))]
        for (image, label), (_, expected, expected_label) in zip(read, split_examples):
            assert label == expected_label and isinstance(label, int)
            assert image.dtype == np.uint8
            np.testing.assert_array_equal(image, expected)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            again = list(pool.map(lambda i: dataset.example(split, i), reversed(range(len(read)))))[::-1]
        clone = pickle.loads(pickle.dumps(dataset))
        for (a, la), (b, lb), (c, lc) in zip(read, again, (clone.example(split, i) for i in range(len(read)))):
            assert la == lb == lc and np.array_equal(a, b) and np.array_equal(a, c)
    json.dumps(dataset.description())
    json.dumps(dataset.fingerprint())


# ---------------------------------------------------------------- sources


def test_saved_dataset_dict(saved, examples):
    dataset = open_dataset(f"hf:{saved}")
    check_examples(dataset, examples)
    assert dataset.example("train", 4)[0].shape == (10, 6, 3)  # stored 6x10, turned upright by its EXIF tag
    description = dataset.description()
    assert description["kind"] == "save_to_disk" and description["path"] == str(saved)
    assert description["image_column"] == "image" and description["label_column"] == "label"
    assert "train=7, test=4" in repr(dataset)


def test_saved_dataset_is_one_split(tmp_path, examples):
    make_split(examples["test"]).save_to_disk(str(tmp_path / "one"))
    dataset = open_dataset(f"hf:{tmp_path / 'one'}")
    assert dataset.splits == {"train": 4}
    assert dataset.example("train", 1)[1] == examples["test"][1][2]


def test_local_parquet_folder_then_the_same_dataset_from_the_cache_offline(tmp_path, examples, monkeypatch):
    repo = tmp_path / "hub" / "tiny"
    (repo / "data").mkdir(parents=True)
    for split, split_examples in examples.items():
        make_split(split_examples).to_parquet(str(repo / "data" / f"{split}-00000-of-00001.parquet"))
    cache = tmp_path / "cache"
    local = open_dataset(f"hf:{repo}", data_dir=str(cache))
    check_examples(local, examples)
    assert local.description()["kind"] == "local" and str(cache) in local.description()["cache_dir"]
    # Loading a folder prepares it in the cache as a Hub dataset named like the folder would be: offline,
    # `hf:tiny` reads that copy (from a working directory without a `tiny` folder).
    monkeypatch.chdir(tmp_path)
    hub = open_dataset("hf:tiny", data_dir=str(cache))
    check_examples(hub, examples)
    commit = hub.description()["hash"]
    assert hub.description()["kind"] == "hub" and hub.description()["repo_id"] == "tiny"
    assert hub.fingerprint()["hash"] == commit and hub.fingerprint()["config"] == "default"
    assert open_dataset(f"hf:tiny@{commit}", data_dir=str(cache)).splits == hub.splits
    with pytest.raises(DatasetError, match=f"holds commit {commit} of tiny, not main .*full commit"):
        open_dataset("hf:tiny@main", data_dir=str(cache))
    with pytest.raises(DatasetError, match="hf:tiny:other: `datasets` cannot open the Hub dataset tiny.*offline"):
        open_dataset("hf:tiny:other", data_dir=str(cache))
    with pytest.raises(DatasetError, match="hf:someone/else: `datasets` cannot open the Hub dataset someone/else"):
        open_dataset("hf:someone/else", data_dir=str(cache))


def test_local_image_folder_reads_the_image_files(tmp_path):
    rng = np.random.default_rng(3)
    written = {}
    for split, count in (("train", 4), ("test", 2)):
        for c, name in enumerate(CLASSES[:2]):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (5 + i, 7, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "images" / split / name / f"{i}.png")
                written.setdefault(split, {})[pixels.tobytes()] = (pixels, c)
    dataset = open_dataset(f"hf:{tmp_path / 'images'}", data_dir=str(tmp_path / "cache"))
    assert dataset.class_names == CLASSES[:2] and dataset.splits == {"train": 8, "test": 4}
    for split, by_pixels in written.items():
        read = [dataset.example(split, i) for i in range(dataset.splits[split])]
        assert sorted(image.tobytes() for image, _ in read) == sorted(by_pixels)
        for image, label in read:
            assert label == by_pixels[image.tobytes()][1]


def test_image_feature_mode_is_applied(tmp_path):
    rgb = np.random.default_rng(4).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    features = datasets.Features({"image": datasets.Image(mode="L"), "label": datasets.ClassLabel(names=["a"])})
    datasets.Dataset.from_dict({"image": [{"bytes": _png(rgb), "path": None}], "label": [0]},
                               features=features).save_to_disk(str(tmp_path / "gray"))
    image, _ = open_dataset(f"hf:{tmp_path / 'gray'}").example("train", 0)
    np.testing.assert_array_equal(image, np.asarray(Image.fromarray(rgb).convert("L")))


def test_columns_found_by_type_or_chosen(tmp_path, examples):
    data = [{"bytes": d, "path": None} for d, _, _ in examples["test"]]
    labels = [y for _, _, y in examples["test"]]
    image, names = datasets.Image(), datasets.ClassLabel(names=list(CLASSES))
    coarse = datasets.ClassLabel(names=["small", "large"])

    def write(name, columns, features):
        datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(tmp_path / name))
        return f"hf:{tmp_path / name}"

    one_each = write("renamed", {"photo": data, "kind": labels}, {"photo": image, "kind": names})
    dataset = open_dataset(one_each)
    assert (dataset.image_column, dataset.label_column) == ("photo", "kind")
    two = write("two", {"image": data, "mask": data, "fine": labels, "coarse": [y % 2 for y in labels]},
                {"image": image, "mask": image, "fine": names, "coarse": coarse})
    with pytest.raises(DatasetError, match=r"2 ClassLabel columns \(fine, coarse\); choose one by appending #label="):
        open_dataset(two)
    dataset = open_dataset(two + "#label=coarse")
    assert dataset.image_column == "image" and dataset.class_names == ("small", "large")
    assert dataset.example("train", 1)[1] == labels[1] % 2
    dataset = open_dataset(two + "#image=mask,label=fine")
    assert (dataset.image_column, dataset.label_column) == ("mask", "fine")
    with pytest.raises(DatasetError, match=r"column 'fine' is ClassLabel, not Image; columns: image \(Image\)"):
        open_dataset(two + "#image=fine,label=fine")
    with pytest.raises(DatasetError, match="no column 'nope'"):
        open_dataset(two + "#label=nope")
    no_label = write("ints", {"image": data, "label": labels}, {"image": image, "label": datasets.Value("int64")})
    with pytest.raises(DatasetError, match=r"no ClassLabel column; columns: image \(Image\), label \(Value\)\. .*"
                                           r"cast_column"):
        open_dataset(no_label)
    no_image = write("bytes", {"png": [d["bytes"] for d in data], "label": labels},
                     {"png": datasets.Value("binary"), "label": names})
    with pytest.raises(DatasetError, match=r"no Image column; columns: png \(Value\), label \(ClassLabel\)"):
        open_dataset(no_image)


def test_an_unlabelled_example_is_an_error_naming_it(tmp_path, examples):
    unlabelled = [(d, x, -1) for d, x, _ in examples["test"]]
    save(tmp_path / "s", {"train": examples["train"], "test": unlabelled})
    dataset = open_dataset(f"hf:{tmp_path / 's'}")
    assert dataset.example("train", 0)[1] == examples["train"][0][2]
    with pytest.raises(DatasetError, match=r"example 2 of split 'test' of hf:.* has no label \(label=-1.*--splits"):
        dataset.example("test", 2)


def test_a_corrupt_image_is_an_error_naming_the_example(tmp_path, examples):
    data, expected, label = examples["test"][1]
    save(tmp_path / "s", {"test": [examples["test"][0], (data[:40], expected, label)]})
    dataset = open_dataset(f"hf:{tmp_path / 's'}")
    with pytest.raises(DatasetError, match=r"cannot decode image example 1 of split 'test' of hf:"):
        dataset.example("test", 1)


def test_fingerprint_follows_the_content(tmp_path, saved, examples):
    fingerprint = open_dataset(f"hf:{saved}").fingerprint()
    assert fingerprint["splits"]["train"]["num_examples"] == 7 and fingerprint["class_names"] == list(CLASSES)
    # The same examples saved elsewhere: the same fingerprint (it names no path).
    shutil.copytree(saved, tmp_path / "copy")
    assert open_dataset(f"hf:{tmp_path / 'copy'}").fingerprint() == fingerprint
    assert pickle.loads(pickle.dumps(open_dataset(f"hf:{saved}"))).fingerprint() == fingerprint
    relabelled = {"train": [(d, x, (y + 1) % 3 if i == 0 else y) for i, (d, x, y) in enumerate(examples["train"])],
                  "test": examples["test"]}
    changed = open_dataset(f"hf:{save(tmp_path / 'relabelled', relabelled)}").fingerprint()
    assert changed["splits"]["train"] != fingerprint["splits"]["train"]
    assert changed["splits"]["test"] == fingerprint["splits"]["test"]
    other_image = (examples["test"][1][0], None, examples["test"][0][2])  # the same label
    repixelled = {"train": examples["train"], "test": [other_image, *examples["test"][1:]]}
    changed = open_dataset(f"hf:{save(tmp_path / 'repixelled', repixelled)}").fingerprint()
    assert changed["splits"]["test"] != fingerprint["splits"]["test"]


@pytest.mark.parametrize(
    "argument, message",
    [
        ("", "give a dataset, as hf:PATH"),
        ("/no/such/dir", "/no/such/dir is not a directory"),
        ("./missing", "missing is not a directory"),
        ("a/b/c", "a/b/c is not a directory"),
        ("bad name!", "cannot parse 'bad name!'"),
        ("org/name@", "cannot parse 'org/name@'"),
        ("org/name:", "empty configuration after ':'"),
        ("org/name#colour=x", "cannot parse the column choice 'colour=x'"),
        ("org/name#image=", "cannot parse the column choice 'image='"),
        ("org/name#image=a,image=b", "cannot parse the column choice 'image=b'"),
    ],
)
def test_bad_specs(argument, message):
    with pytest.raises(DatasetError, match="^hf:" + ".*" + message.replace("(", r"\(")):
        open_dataset(f"hf:{argument}")


def test_a_local_directory_may_hold_at_and_colon_and_takes_no_revision(tmp_path, saved):
    odd = tmp_path / "v1@x:y"
    shutil.copytree(saved, odd)
    assert open_dataset(f"hf:{odd}").splits == {"train": 7, "test": 4}
    with pytest.raises(DatasetError, match="@main names a Hub revision, but .* is a local directory"):
        open_dataset(f"hf:{saved}@main")
    with pytest.raises(DatasetError, match="written by save_to_disk, which keeps no configurations; drop :cfg"):
        open_dataset(f"hf:{saved}:cfg")


def test_workers_import_neither_datasets_nor_pandas(saved):
    """Loader workers unpickle the source: that must not import `datasets` (about a second, and pandas)."""
    import subprocess
    import sys

    blob = pickle.dumps(open_dataset(f"hf:{saved}"))
    code = ("import pickle, sys; d = pickle.loads(sys.stdin.buffer.read()); d.example('test', 3); "
            "print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True)
    assert result.stdout.decode().strip() == "[]", result.stderr.decode()


# ---------------------------------------------------------------- extraction


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_extract_through_the_cli_and_the_library(tmp_path, saved, examples):
    pytest.importorskip("kymatio")
    from featdp.extraction.extract import ExtractConfig, extract
    from featdp.featurefile import FeatureFile

    spec = f"hf:{saved}"
    out = tmp_path / "cli.h5"
    result = invoke("extract", "-b", BACKBONE, "-d", spec, "--out", out, "--workers", "1")
    assert result.exit_code == 0, result.output
    # Loader processes receive the pickled source.
    library = extract(ExtractConfig(backbone=BACKBONE, dataset=spec, out=tmp_path / "lib.h5", limit=3, workers=2,
                                    batch_size=2))
    source = open_dataset(spec)
    for path, limit in ((out, None), (library, 3)):
        with FeatureFile(path) as handle:
            meta = handle.metadata
            assert meta.class_names == CLASSES and meta.dataset == spec
            assert meta.source_fingerprint == source.fingerprint()
            assert set(handle.split_names) == {"train", "test"}
            for split, split_examples in examples.items():
                features, labels = handle.split(split).read()
                expected = [y for _, _, y in split_examples][:limit]
                np.testing.assert_array_equal(labels, expected)
                np.testing.assert_array_equal(handle.split(split).read_index(), np.arange(len(expected)))
                assert features.shape == (len(expected), meta.feature_dim) and np.isfinite(features).all()
    with FeatureFile(out) as full, FeatureFile(library) as part:
        # Other batch sizes and loaders, the same rows (float16 storage: compared at its precision).
        np.testing.assert_allclose(part.split("train").read()[0], full.split("train").read()[0][:3], rtol=2e-3,
                                   atol=2e-3)


def test_resuming_onto_a_changed_dataset_is_refused(tmp_path, examples):
    path = save(tmp_path / "data", examples)
    out = tmp_path / "f.h5"
    command = ["extract", "-b", BACKBONE, "-d", f"hf:{path}", "--out", out, "--workers", "1", "--splits", "train",
               "--limit", "3"]
    pytest.importorskip("kymatio")
    assert invoke(*command).exit_code == 0
    relabelled = {split: [(d, x, (y + 1) % 3) for d, x, y in e] for split, e in examples.items()}
    shutil.rmtree(path)
    save(path, relabelled)
    result = invoke(*command, "--splits", "train,test")
    assert result.exit_code == 2, result.output
    assert len(_error_lines(result.output)) == 1 and "Traceback" not in result.output
    assert f"the source hf:{path} changed" in result.output and "--overwrite" in result.output
    result = invoke(*command, "--overwrite")
    assert result.exit_code == 0, result.output


def _spec_without(tmp_path, examples, drop):
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))}
    columns = {"image": [{"bytes": d, "path": None} for d, _, _ in examples["test"]],
               "label": [y for _, _, y in examples["test"]]}
    del features[drop], columns[drop]
    path = tmp_path / f"no-{drop}"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(path))
    return f"hf:{path}"


@pytest.mark.parametrize("case", ["missing path", "no image column", "no label column", "unknown split"])
def test_cli_bad_datasets_fail_with_one_error_line_and_no_file(tmp_path, saved, examples, case):
    data = tmp_path / "data"
    data.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    spec, extra, named = {
        "missing path": (f"hf:{data / 'missing'}", [], str(data / "missing")),
        "no image column": (_spec_without(data, examples, "image"), [], "no Image column"),
        "no label column": (_spec_without(data, examples, "label"), [], "no ClassLabel column"),
        "unknown split": (f"hf:{saved}", ["--splits", "train,validation"], "'validation'"),
    }[case]
    result = invoke("extract", "-b", BACKBONE, "-d", spec, "--out", out_dir / "f.h5", "--workers", "1", *extra)
    assert result.exit_code == 2, result.output
    errors = _error_lines(result.output)
    assert len(errors) == 1 and named in errors[0], result.output
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []
