"""CLIP image towers: features against timm's `vit_*_clip[_quickgelu]_*` (the oracle) from the same random
weights, through featdp's loaders (timm safetensors and the OpenAI/OpenCLIP `visual.*` layout), before
and after the projection, plus the activation choice from the metadata beside the weights."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import pytest
from test_backbones_vit import PARITY_RTOL, _import_timm, _random_timm_vit, _state_dict, rel_err

from featdp.extraction.backbones import clip, vit
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone
from featdp.extraction.backbones.vit_checkpoints import (
    CheckpointFile,
    ViTCheckpointError,
    convert_checkpoint,
    expected_checkpoint_shapes,
)

B16_DEPTH2 = dataclasses.replace(clip.CONFIGS["clip-vit-b16"], depth=2)
B16_DEPTH2_PROJ = dataclasses.replace(clip.CONFIGS["clip-vit-b16-proj"], depth=2)


def clip_pixels(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255
    return ((x - np.asarray(clip.CLIP_MEAN, np.float32)) / np.asarray(clip.CLIP_STD, np.float32)).transpose(0, 3, 1, 2)


def timm_outputs(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class token before the projection, embedding after it)."""
    import torch

    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(clip_pixels(images).copy()))
        return (model.forward_head(tokens, pre_logits=True).numpy(), model.forward_head(tokens).numpy())


def to_open_clip(state: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """timm CLIP weights in OpenCLIP's names (as OpenAI's state dict has them), plus a text tower."""
    out = {
        "visual.conv1.weight": state["patch_embed.proj.weight"],
        "visual.class_embedding": state["cls_token"].reshape(-1),
        "visual.positional_embedding": state["pos_embed"][0],
        "visual.ln_pre.weight": state["norm_pre.weight"], "visual.ln_pre.bias": state["norm_pre.bias"],
        "visual.ln_post.weight": state["norm.weight"], "visual.ln_post.bias": state["norm.bias"],
        "visual.proj": state["head.weight"].T.copy(),
    }
    names = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
             "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(depth):
        for key, value in state.items():
            if key.startswith(f"blocks.{i}."):
                rest = key[len(f"blocks.{i}."):]
                for old, new in names.items():
                    rest = rest.replace(old, new)
                out[f"visual.transformer.resblocks.{i}.{rest}"] = value
    rng = np.random.default_rng(0)
    for key, shape in (("positional_embedding", (77, 16)), ("token_embedding.weight", (100, 16)),
                       ("text_projection", (16, 8)), ("logit_scale", ()), ("ln_final.weight", (16,))):
        out[key] = rng.normal(size=shape).astype(np.float32)
    for i in range(5):
        out[f"transformer.resblocks.{i}.ln_1.weight"] = np.ones(16, np.float32)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Depth-2 CLIP ViT-B/16 (QuickGELU, OpenAI's) with random weights, head bias 0 as in CLIP."""
    timm = _import_timm()
    import safetensors.torch
    import torch

    model = _random_timm_vit(timm, name="vit_base_patch16_clip_quickgelu_224", depth=2, num_classes=512)
    with torch.no_grad():
        model.head.bias.zero_()
    folder = tmp_path_factory.mktemp("clip")
    path = folder / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    pre, post = timm_outputs(model, images)
    return dict(timm=timm, model=model, path=path, images=images, state=_state_dict(model), pre=pre, post=post)


def features(backbone, images):
    return np.asarray(jax.jit(backbone.apply)(backbone.variables, images))


def test_registered_clip_configs_have_timms_shapes():
    timm = _import_timm()
    import torch

    for name, timm_name, proj in (("clip-vit-b16", "vit_base_patch16_clip_224", 512),
                                  ("clip-vit-l14", "vit_large_patch14_clip_224", 768)):
        for suffix, classes in (("", 0), ("-proj", proj)):
            with torch.device("meta"):
                model = timm.create_model(timm_name, pretrained=False, num_classes=classes)
            got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            assert got == expected_checkpoint_shapes(clip.CONFIGS[name + suffix], "timm"), name + suffix
    specs = backbone_specs()
    assert [(specs[n].feature_dim, specs[n].image_size) for n in
            ("clip-vit-b16", "clip-vit-b16-proj", "clip-vit-l14", "clip-vit-l14-proj")] == [
        (768, 224), (512, 224), (1024, 224), (768, 224)]


def test_timm_safetensors_match_timm_before_and_after_the_projection(ref):
    with pytest.warns(UserWarning, match="assuming QuickGELU"):  # a bare file: nothing says which activation
        pre = vit.make_backbone(B16_DEPTH2, str(ref["path"]), activation=clip.clip_activation)
    post = vit.make_backbone(B16_DEPTH2_PROJ, str(ref["path"]), activation="quick_gelu")
    got_pre, got_post = features(pre, ref["images"]), features(post, ref["images"])
    assert got_pre.shape == (2, 768) and got_post.shape == (2, 512)
    err_pre, err_post = rel_err(got_pre, ref["pre"]), rel_err(got_post, ref["post"])
    print(f"CLIP B/16 depth 2 vs timm: pre-projection {err_pre:.2e}, projected {err_post:.2e}")
    assert err_pre <= PARITY_RTOL and err_post <= PARITY_RTOL
    assert pre.preprocessing["ignored_checkpoint_tensors"] == ["head.bias", "head.weight"]
    assert post.preprocessing["ignored_checkpoint_tensors"] == []
    assert pre.preprocessing["activation"] == "quick_gelu"
    assert pre.preprocessing["normalize"]["mean"] == list(clip.CLIP_MEAN)
    assert pre.preprocessing["layer_norm_epsilon"] == 1e-5 and pre.preprocessing["pre_norm"] is True


def test_open_clip_layout_with_its_config_matches_timm(ref, tmp_path):
    """OpenCLIP names (OpenAI's state dict too); open_clip_config.json beside the weights decides the
    activation: QuickGELU here, GELU (LAION models) against timm's GELU tower below."""
    save_file = pytest.importorskip("safetensors.numpy").save_file
    path = tmp_path / "open_clip_model.safetensors"
    save_file(to_open_clip(ref["state"], depth=2), str(path))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 512, "quick_gelu": True}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        post = vit.make_backbone(B16_DEPTH2_PROJ, str(path), activation=clip.clip_activation)
    assert post.preprocessing["checkpoint_format"] == "timm (from open_clip)"
    assert post.preprocessing["activation_source"] == "open_clip_config.json: model_cfg.quick_gelu = true"
    assert rel_err(features(post, ref["images"]), ref["post"]) <= PARITY_RTOL
    ignored = post.preprocessing["ignored_checkpoint_tensors"]
    assert "logit_scale" in ignored and "transformer.* (5 tensors)" in ignored and "text_projection" in ignored


def test_gelu_tower_from_open_clip_config(ref, tmp_path):
    import safetensors.numpy
    import torch

    model = _random_timm_vit(ref["timm"], name="vit_base_patch16_clip_224", depth=2, num_classes=512, seed=3)
    with torch.no_grad():
        model.head.bias.zero_()
    path = tmp_path / "open_clip_pytorch_model.safetensors"
    safetensors.numpy.save_file(to_open_clip(_state_dict(model), depth=2), str(path))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 512}}))
    pre = vit.make_backbone(B16_DEPTH2, str(path), activation=clip.clip_activation)
    assert pre.preprocessing["activation"] == "gelu"
    want_pre, _ = timm_outputs(model, ref["images"])
    err = rel_err(features(pre, ref["images"]), want_pre)
    print(f"CLIP B/16 (GELU, OpenCLIP layout) depth 2 vs timm: {err:.2e}")
    assert err <= PARITY_RTOL


def test_activation_from_timm_config(tmp_path):
    file = CheckpointFile(tmp_path / "model.safetensors", "x")
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_base_patch16_clip_224", "pretrained_cfg": {"tag": "openai"}}))
    assert clip.clip_activation(file)[0] == "quick_gelu"
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_base_patch16_clip_224", "pretrained_cfg": {"tag": "laion2b_s34b_b88k"}}))
    assert clip.clip_activation(file)[0] == "gelu"
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_base_patch16_clip_quickgelu_224"}))
    assert clip.clip_activation(file)[0] == "quick_gelu"
    hub = CheckpointFile(tmp_path / "sub" / "model.safetensors", "x", {"repo_id": "timm/vit_base_patch16_clip_224.openai"})
    assert clip.clip_activation(hub) == ("quick_gelu", "repository timm/vit_base_patch16_clip_224.openai (OpenAI weights)")


def test_registered_clip_needs_a_checkpoint_and_checks_it(ref):
    with pytest.raises(BackboneError, match="hf-hub:timm/vit_base_patch16_clip_224.openai"):
        load_backbone("clip-vit-b16")
    # A depth-2 file for the 12-block registered tower: the first block it lacks is named.
    with pytest.raises(ViTCheckpointError, match=r"first difference: blocks\.2\.norm1\.weight is missing"):
        convert_checkpoint(ref["state"], clip.CONFIGS["clip-vit-b16"])
    # A supervised ViT file for CLIP: no pre-norm, a patch bias.
    sup = {k: v for k, v in ref["state"].items() if not k.startswith("norm_pre")}
    with pytest.raises(ViTCheckpointError, match=r"first difference: norm_pre\.weight is missing"):
        convert_checkpoint(sup, B16_DEPTH2)


def test_clip_prepare_is_a_center_crop():
    backbone = vit.random_backbone(dataclasses.replace(B16_DEPTH2, depth=1))
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    out = backbone.prepare(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    from featdp.extraction.backbones.pil_preprocessing import center_crop_resize

    np.testing.assert_array_equal(out, center_crop_resize(image, 224, 1.0))
