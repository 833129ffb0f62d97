"""SigLIP image towers: MAP-head features against timm's `vit_*_siglip_*` (the oracle) from the same random
weights, through featdp's loaders (timm safetensors, big_vision .npz plain and scanned, OpenCLIP's
`visual.trunk.*`), and the squash preprocessing."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from test_backbones_vit import PARITY_RTOL, _import_timm, _npz_from_timm, _random_timm_vit, _state_dict, rel_err

from featdp.extraction.backbones import siglip, vit
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone
from featdp.extraction.backbones.vit_checkpoints import ViTCheckpointError, convert_checkpoint, expected_checkpoint_shapes

B16_DEPTH2 = dataclasses.replace(siglip.CONFIGS["siglip-vit-b16"], depth=2)


def timm_map_features(model, images: np.ndarray) -> np.ndarray:
    import torch

    x = torch.from_numpy(((images.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True).numpy()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Depth-2 SigLIP B/16 with random weights, GELU in its tanh form as big_vision trained it."""
    timm = _import_timm()
    import safetensors.torch

    model = _random_timm_vit(timm, name="vit_base_patch16_siglip_224", depth=2, act_layer="gelu_tanh")
    path = tmp_path_factory.mktemp("siglip") / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    images = np.random.default_rng(2).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    return dict(timm=timm, model=model, path=path, images=images, state=_state_dict(model),
                features=timm_map_features(model, images))


def features(backbone_or_apply, variables, images):
    return np.asarray(jax.jit(backbone_or_apply)(variables, images))


def test_registered_siglip_configs_have_timms_shapes():
    timm = _import_timm()
    import torch

    for name, timm_name in (("siglip-vit-b16", "vit_base_patch16_siglip_224"),
                            ("siglip-so400m14", "vit_so400m_patch14_siglip_224")):
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == expected_checkpoint_shapes(siglip.CONFIGS[name], "timm"), name
    specs = backbone_specs()
    assert (specs["siglip-vit-b16"].feature_dim, specs["siglip-so400m14"].feature_dim) == (768, 1152)


def test_timm_safetensors_match_timm(ref):
    backbone = vit.make_backbone(B16_DEPTH2, str(ref["path"]))
    got = features(backbone.apply, backbone.variables, ref["images"])
    err = rel_err(got, ref["features"])
    print(f"SigLIP B/16 depth 2 (MAP) vs timm: {err:.2e}")
    assert got.shape == (2, 768) and err <= PARITY_RTOL
    meta = backbone.preprocessing
    assert meta["pool"] == "map" and meta["gelu"] == "tanh approximation" and meta["crop"].startswith("none")
    assert meta["normalize"]["mean"] == [0.5, 0.5, 0.5]


def test_exact_gelu_variant_matches_timms_default(ref, tmp_path):
    import safetensors.torch

    model = _random_timm_vit(ref["timm"], name="vit_base_patch16_siglip_224", depth=2, seed=5)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    backbone = vit.make_backbone(B16_DEPTH2, str(path), gelu_approximate=False)
    assert rel_err(features(backbone.apply, backbone.variables, ref["images"]),
                   timm_map_features(model, ref["images"])) <= PARITY_RTOL


@pytest.mark.parametrize("layout", ["big_vision", "big_vision_scan"])
def test_big_vision_npz_matches_timm(ref, layout, tmp_path):
    path = tmp_path / "siglip.npz"
    np.savez(path, **_npz_from_timm(ref["state"], layout, depth=2, heads=12))
    backbone = vit.make_backbone(B16_DEPTH2, str(path))
    assert backbone.preprocessing["checkpoint_format"] == "big_vision"
    assert "params/img/head/kernel" in backbone.preprocessing["ignored_checkpoint_tensors"]
    err = rel_err(features(backbone.apply, backbone.variables, ref["images"]), ref["features"])
    print(f"SigLIP B/16 depth 2 ({layout} .npz) vs timm: {err:.2e}")
    assert err <= PARITY_RTOL


def test_open_clip_timm_trunk_matches_timm(ref, tmp_path):
    save_file = pytest.importorskip("safetensors.numpy").save_file
    state = {f"visual.trunk.{k}": v for k, v in ref["state"].items()}
    state.update({"text.token_embedding.weight": np.zeros((10, 4), np.float32),
                  "logit_scale": np.ones((1,), np.float32), "logit_bias": np.zeros((1,), np.float32)})
    path = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(path))
    backbone = vit.make_backbone(B16_DEPTH2, str(path))
    assert backbone.preprocessing["checkpoint_format"] == "timm (from open_clip)"
    assert set(backbone.preprocessing["ignored_checkpoint_tensors"]) == {
        "text.token_embedding.weight", "logit_scale", "logit_bias"}
    assert rel_err(features(backbone.apply, backbone.variables, ref["images"]), ref["features"]) <= PARITY_RTOL


def test_mismatches_name_the_first_differing_tensor(ref):
    with pytest.raises(BackboneError, match="hf-hub:timm/vit_base_patch16_siglip_224.webli"):
        load_backbone("siglip-vit-b16")
    no_head = {k: v for k, v in ref["state"].items() if not k.startswith("attn_pool.")}
    with pytest.raises(ViTCheckpointError, match=r"first difference: attn_pool\.latent is missing"):
        convert_checkpoint(no_head, B16_DEPTH2)
    with pytest.raises(ViTCheckpointError, match=r"first difference: pos_embed has shape \(1, 196, 768\), "
                                                 r"expected \(1, 196, 1152\)(.|\n)*the checkpoint has width 768, depth 2, patch 16, MAP head"):
        convert_checkpoint(ref["state"], dataclasses.replace(siglip.CONFIGS["siglip-so400m14"], depth=2))


def test_squash_resize_keeps_the_whole_image():
    from PIL import Image

    backbone = vit.random_backbone(dataclasses.replace(B16_DEPTH2, depth=1))
    image = np.random.default_rng(0).integers(0, 256, (200, 400, 3), dtype=np.uint8)
    out = backbone.prepare(image)
    want = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out, want)
    square = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(backbone.prepare(square), square)
