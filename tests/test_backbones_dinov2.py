"""DINOv2: features against timm's `vit_*_patch14[_reg4]_dinov2` (the oracle) from the same random weights,
through featdp's loaders (timm safetensors and DINOv2's own `.pth`), for class token ‖ mean patch token
and class token alone, with registers, with ViT-g's SwiGLU, and the position-embedding resampling
DINOv2 applies at 224."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from test_backbones_vit import PARITY_RTOL, _import_timm, _random_timm_vit, _state_dict, rel_err

from featdp.extraction.backbones import dinov2, vit
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone
from featdp.extraction.backbones.vit_checkpoints import (
    ViTCheckpointError,
    convert_checkpoint,
    cubic_resize_matrix,
    expected_checkpoint_shapes,
    resize_pos_embed,
)


def small(name: str, depth: int = 2) -> vit.ViTConfig:
    return dataclasses.replace(dinov2.CONFIGS[name], depth=depth)


def timm_features(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class token ‖ mean of the patch tokens, class token), both after the final norm."""
    import torch

    x = images.astype(np.float32) / 255
    x = (x - np.asarray(dinov2.IMAGENET_MEAN, np.float32)) / np.asarray(dinov2.IMAGENET_STD, np.float32)
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        cls = model.forward_head(tokens, pre_logits=True)
        patches = tokens[:, model.num_prefix_tokens:].mean(1)
        return torch.cat([tokens[:, 0], patches], dim=-1).numpy(), cls.numpy()


def run(backbone, images):
    return np.asarray(jax.jit(backbone.apply)(backbone.variables, images))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def timm():
    return _import_timm()


def save(model, path):
    import safetensors.torch

    safetensors.torch.save_file(model.state_dict(), str(path))
    return str(path)


def test_registered_dinov2_configs_have_timms_shapes(timm):
    import torch

    for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant")):
        for reg in ("", "_reg4"):
            with torch.device("meta"):
                model = timm.create_model(f"vit_{timm_size}_patch14{reg}_dinov2", pretrained=False, num_classes=0,
                                          img_size=224)
            got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            for cls in ("", "-cls"):
                name = f"dinov2-vit-{size}14{'-reg' if reg else ''}{cls}"
                assert got == expected_checkpoint_shapes(dinov2.CONFIGS[name], "timm"), name
    specs = backbone_specs()
    assert [specs[n].feature_dim for n in ("dinov2-vit-s14", "dinov2-vit-b14", "dinov2-vit-l14", "dinov2-vit-g14",
                                           "dinov2-vit-b14-cls", "dinov2-vit-b14-reg")] == [
        768, 1536, 2048, 3072, 768, 1536]


@pytest.mark.parametrize("timm_name,name", [
    ("vit_small_patch14_dinov2", "dinov2-vit-s14"),
    ("vit_small_patch14_reg4_dinov2", "dinov2-vit-s14-reg"),
])
def test_timm_safetensors_match_timm(timm, images, timm_name, name, tmp_path):
    model = _random_timm_vit(timm, name=timm_name, depth=2, img_size=224)
    path = save(model, tmp_path / "model.safetensors")
    want_cat, want_cls = timm_features(model, images)
    cat = vit.make_backbone(small(name), path)
    cls = vit.make_backbone(small(name + "-cls"), path)
    got_cat, got_cls = run(cat, images), run(cls, images)
    assert got_cat.shape == (2, 768) and got_cls.shape == (2, 384)
    err_cat, err_cls = rel_err(got_cat, want_cat), rel_err(got_cls, want_cls)
    print(f"{name} depth 2 vs timm: cls‖mean {err_cat:.2e}, cls {err_cls:.2e}")
    assert err_cat <= PARITY_RTOL and err_cls <= PARITY_RTOL
    meta = cat.preprocessing
    assert meta["pool"] == "token+gap" and meta["layer_scale"] is True
    assert meta["registers"] == (4 if "reg" in name else 0)
    assert meta["normalize"]["mean"] == list(dinov2.IMAGENET_MEAN) and meta["crop"] == "central 0.875 of the shorter side"


def test_giant_swiglu_matches_timm(timm, images, tmp_path):
    model = _random_timm_vit(timm, name="vit_giant_patch14_dinov2", depth=1, img_size=224)
    path = save(model, tmp_path / "model.safetensors")
    backbone = vit.make_backbone(small("dinov2-vit-g14", depth=1), path)
    err = rel_err(run(backbone, images), timm_features(model, images)[0])
    print(f"dinov2-vit-g14 (SwiGLU) depth 1 vs timm: {err:.2e}")
    assert err <= PARITY_RTOL


@pytest.mark.parametrize("timm_name,name,depth", [
    ("vit_small_patch14_reg4_dinov2", "dinov2-vit-s14-reg", 2),
    ("vit_giant_patch14_dinov2", "dinov2-vit-g14", 1),
])
def test_original_pth_matches_timm(timm, images, timm_name, name, depth, tmp_path):
    import torch

    model = _random_timm_vit(timm, name=timm_name, depth=depth, img_size=224)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original = {}
    for key, value in state.items():
        if name.startswith("dinov2-vit-g14"):
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        original[key] = value
    original["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    if "reg_token" in original:
        original["register_tokens"] = original.pop("reg_token")
        original["pos_embed"] = torch.cat([torch.zeros_like(original["cls_token"]), original["pos_embed"]], dim=1)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(original, path)
    backbone = vit.make_backbone(small(name, depth), str(path))
    assert backbone.preprocessing["checkpoint_format"] == "timm (from dinov2)"
    assert backbone.preprocessing["ignored_checkpoint_tensors"] == ["mask_token"]
    assert rel_err(run(backbone, images), timm_features(model, images)[0]) <= PARITY_RTOL


def test_cubic_resize_matches_torch_bicubic():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    grid = np.random.default_rng(0).normal(size=(9, 9, 4)).astype(np.float32)
    t = torch.from_numpy(grid).permute(2, 0, 1)[None].double()
    for size in (4, 9, 16, 37):
        want = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(resize_pos_embed(grid, size, "bicubic"), want, rtol=1e-5, atol=1e-5)
        if size == 9:  # the same grid: DINOv2 (and the loader) keep the embedding as it is
            np.testing.assert_array_equal(resize_pos_embed(grid, size, "bicubic_dinov2"), grid)
            continue
        scale = (size + 0.1) / 9  # DINOv2's interpolate_pos_encoding
        want = F.interpolate(t, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        np.testing.assert_allclose(resize_pos_embed(grid, size, "bicubic_dinov2"),
                                   want[0].permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cubic_resize_matrix(5, 11).sum(axis=1), 1.0)


def test_checkpoint_grid_is_resampled_to_224_as_dinov2_does(timm, images, tmp_path):
    """A checkpoint stored at another grid (the released ones: 37×37 at 518) runs at 224, its position
    embedding resampled as DINOv2 does at run time (here 8×8 -> 16×16, scale factor 16.1/8)."""
    import torch

    model = _random_timm_vit(timm, name="vit_small_patch14_dinov2", depth=2, img_size=112)
    path = save(model, tmp_path / "model.safetensors")
    backbone = vit.make_backbone(small("dinov2-vit-s14"), path)
    assert backbone.image_size == 224 and backbone.preprocessing["checkpoint_image_size"] == 112
    assert backbone.preprocessing["pos_embed"] == "resampled (bicubic_dinov2) from 8^2 to 16^2"

    at_224 = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2,
                               img_size=224).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pos = state["pos_embed"]
    grid = pos[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 8, 16.1 / 8), mode="bicubic",
                                           align_corners=False)
    state["pos_embed"] = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1)
    at_224.load_state_dict(state)
    assert rel_err(run(backbone, images), timm_features(at_224, images)[0]) <= PARITY_RTOL


def test_wrong_variant_is_a_clear_error(timm, tmp_path):
    with pytest.raises(BackboneError, match="hf-hub:timm/vit_base_patch14_dinov2.lvd142m"):
        load_backbone("dinov2-vit-b14")
    reg = _state_dict(_random_timm_vit(timm, name="vit_small_patch14_reg4_dinov2", depth=2, img_size=224))
    with pytest.raises(ViTCheckpointError, match=r"first difference: reg_token is not part of dinov2-vit-s14"):
        convert_checkpoint(reg, small("dinov2-vit-s14"))
    plain = {k: v for k, v in reg.items() if k != "reg_token"}
    with pytest.raises(ViTCheckpointError, match=r"first difference: reg_token is missing"):
        convert_checkpoint(plain, small("dinov2-vit-s14-reg"))
    no_ls = {k: v for k, v in plain.items() if ".ls" not in k}
    with pytest.raises(ViTCheckpointError, match=r"first difference: blocks\.0\.ls1\.gamma is missing"):
        convert_checkpoint(no_ls, small("dinov2-vit-s14"))
