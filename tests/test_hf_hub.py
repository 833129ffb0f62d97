"""`--checkpoint hf-hub:ORG/NAME[@REVISION][:FILE]`: resolved offline from a Hugging Face cache the tests
build (HF_HUB_OFFLINE=1, HF_HOME/HF_HUB_CACHE under tmp_path, huggingface_hub's layout:
models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<name>}),
with revision pinning, the file's sha256 as provenance, and clear errors; plus `featdp backbones`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from featdp.extraction.backbones import dinov2, hf_hub, vit
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone
from featdp.extraction.backbones.vit_checkpoints import ViTCheckpointError, expected_checkpoint_shapes

pytest.importorskip("huggingface_hub")
save_file = pytest.importorskip("safetensors.numpy").save_file

REPO = "featdp-test/tiny-dinov2"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
TINY = dataclasses.replace(dinov2.CONFIGS["dinov2-vit-s14"], name="dinov2-tiny-test", width=64, depth=2, num_heads=4,
                           mlp_dim=128, image_size=56)


def synthetic(config: vit.ViTConfig, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.normal(size=s)).astype(np.float32)
            for k, s in expected_checkpoint_shapes(config, "timm").items()}


def put(cache, repo: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> None:
    """Adds a snapshot to a huggingface_hub cache: content-addressed blobs, snapshot symlinks, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def safetensors_bytes(tensors: dict[str, np.ndarray], tmp_path, name="w.safetensors") -> bytes:
    path = tmp_path / name
    save_file(tensors, str(path))
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline cache with two commits of a tiny DINOv2: main -> A, tag v1 -> B."""
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = safetensors_bytes(synthetic(TINY, 0), tmp_path, "a.safetensors")
    b = safetensors_bytes(synthetic(TINY, 1), tmp_path, "b.safetensors")
    put(cache, REPO, COMMIT_A, {"model.safetensors": a}, refs=("main",))
    put(cache, REPO, COMMIT_B, {"model.safetensors": b}, refs=("v1",))
    return dict(cache=cache, a=a, b=b, tmp=tmp_path)


def test_parse_hub_spec():
    assert hf_hub.parse_hub_spec("hf-hub:timm/vit_base_patch16_clip_224.openai") == hf_hub.HubSpec(
        "timm/vit_base_patch16_clip_224.openai", "main", None)
    assert hf_hub.parse_hub_spec("hf-hub:a/b@v1.0:sub/model.safetensors") == hf_hub.HubSpec(
        "a/b", "v1.0", "sub/model.safetensors")
    for bad in ("hf-hub:nope", "hf-hub:a/b/c", "hf-hub:a/b@", "hf-hub:a/b:", "hf-hub:"):
        with pytest.raises(BackboneError, match="expected hf-hub:ORG/NAME"):
            hf_hub.parse_hub_spec(bad)


def test_loads_from_the_cache_offline_with_sha256_and_commit(hub, tmp_path):
    backbone = vit.make_backbone(TINY, f"hf-hub:{REPO}")
    assert backbone.checkpoint == f"hf-hub:{REPO}@{COMMIT_A}:model.safetensors"
    assert backbone.checkpoint_sha256 == hashlib.sha256(hub["a"]).hexdigest()
    assert backbone.preprocessing["hf_hub"] == {"repo_id": REPO, "revision": "main", "commit": COMMIT_A,
                                                "filename": "model.safetensors"}
    # The same bytes from a plain path give the same features.
    local = tmp_path / "local.safetensors"
    local.write_bytes(hub["a"])
    plain = vit.make_backbone(TINY, str(local))
    images = np.random.default_rng(0).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(jax.jit(backbone.apply)(backbone.variables, images)),
                                  np.asarray(jax.jit(plain.apply)(plain.variables, images)))


@pytest.mark.parametrize("spec,commit,blob", [
    (f"hf-hub:{REPO}@main", COMMIT_A, "a"),
    (f"hf-hub:{REPO}@v1", COMMIT_B, "b"),
    (f"hf-hub:{REPO}@{COMMIT_B}", COMMIT_B, "b"),
    (f"hf-hub:{REPO}@{COMMIT_A}:model.safetensors", COMMIT_A, "a"),
])
def test_revisions_pin_the_file(hub, spec, commit, blob):
    backbone = vit.make_backbone(TINY, spec)
    assert backbone.checkpoint == f"hf-hub:{REPO}@{commit}:model.safetensors"
    assert backbone.checkpoint_sha256 == hashlib.sha256(hub[blob]).hexdigest()


def test_missing_repo_revision_or_file_is_a_clear_error(hub):
    for spec in (f"hf-hub:{REPO}@v2", "hf-hub:featdp-test/absent", f"hf-hub:{REPO}:other.safetensors"):
        with pytest.raises(BackboneError, match="HF_HUB_OFFLINE is set") as err:
            vit.make_backbone(TINY, spec)
        assert str(hub["cache"]) in str(err.value)


def test_open_clip_files_come_first_and_metadata_comes_along(hub):
    """A CLIP repository: OpenCLIP's file is taken over a (transformers-layout) model.safetensors, and
    open_clip_config.json, cached beside it, decides the activation."""
    from featdp.extraction.backbones import clip

    config = dataclasses.replace(clip.CONFIGS["clip-vit-b16"], width=64, depth=1, num_heads=4, mlp_dim=128,
                                 image_size=32)
    tensors = synthetic(dataclasses.replace(config, activation="gelu"), 2)
    files = {"open_clip_model.safetensors": safetensors_bytes(tensors, hub["tmp"], "oc.safetensors"),
             "model.safetensors": safetensors_bytes({"vision_model.embeddings.patch_embedding.weight":
                                                     np.zeros((2, 3, 16, 16), np.float32)}, hub["tmp"], "hf.st"),
             "open_clip_config.json": json.dumps({"model_cfg": {"quick_gelu": False}}).encode()}
    put(hub["cache"], "featdp-test/tiny-clip", COMMIT_A, files, refs=("main",))
    backbone = vit.make_backbone(config, "hf-hub:featdp-test/tiny-clip", activation=clip.clip_activation)
    assert backbone.checkpoint.endswith(":open_clip_model.safetensors")
    assert backbone.preprocessing["activation"] == "gelu"
    with pytest.raises(ViTCheckpointError, match="transformers checkpoint, which is not read"):
        vit.make_backbone(config, "hf-hub:featdp-test/tiny-clip:model.safetensors", activation="gelu")


def test_registered_backbone_from_the_hub_and_a_mismatch(hub):
    put(hub["cache"], "timm/vit_small_patch14_dinov2.lvd142m", COMMIT_A,
        {"model.safetensors": safetensors_bytes(synthetic(dinov2.CONFIGS["dinov2-vit-s14"], 0), hub["tmp"])},
        refs=("main",))
    backbone = load_backbone("dinov2-vit-s14", "hf-hub:timm/vit_small_patch14_dinov2.lvd142m")
    assert (backbone.feature_dim, backbone.image_size) == (768, 224)
    out = jax.eval_shape(backbone.apply, backbone.variables, jax.ShapeDtypeStruct((2, 224, 224, 3), np.uint8))
    assert out.shape == (2, 768)
    # The tiny checkpoint is not a ViT-S/14: the error (BackboneError: the CLI's `error:`, exit 2) names
    # the first tensor that differs.
    with pytest.raises(ViTCheckpointError, match=r"first difference: cls_token has shape \(1, 1, 64\), "
                                                 r"expected \(1, 1, 384\)") as err:
        load_backbone("dinov2-vit-s14", f"hf-hub:{REPO}")
    assert isinstance(err.value, BackboneError) and "does not match dinov2-vit-s14" in str(err.value)


def test_featdp_backbones_lists_every_family():
    typer_testing = pytest.importorskip("typer.testing")
    from featdp_cli.main import app

    result = typer_testing.CliRunner().invoke(app, ["backbones"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    specs = backbone_specs()
    for name in ("clip-vit-b16", "clip-vit-l14", "clip-vit-b16-proj", "siglip-vit-b16", "siglip-so400m14",
                 "dinov2-vit-s14", "dinov2-vit-b14", "dinov2-vit-l14", "dinov2-vit-g14", "dinov2-vit-b14-reg",
                 "dinov2-vit-b14-cls"):
        row = next(line for line in lines if f" {name} " in line)
        assert f" {specs[name].feature_dim} " in row and "224x224" in row and "hf-hub:" in row, row
