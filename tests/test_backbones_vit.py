"""ViT backbones: features against timm (the oracle) from the same random weights, through every
checkpoint layout the loader reads, plus the loader's error reports.

timm-based tests need torch and timm (the `test` extra); the rest run on numpy and JAX alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featdp.extraction.backbones import vit, vit_checkpoints
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone
from featdp.extraction.backbones.vit_checkpoints import (
    ViTCheckpointError,
    convert_checkpoint,
    expected_checkpoint_shapes,
    linear_resize_matrix,
    resize_pos_embed,
)

PARITY_RTOL = 1e-4
BF16_RTOL = 5e-2
B16_DEPTH2 = dataclasses.replace(vit.get_config("vit-b16"), depth=2)
TINY = vit.ViTConfig("vit-tiny-test", width=64, depth=2, num_heads=4, mlp_dim=128, patch_size=8, image_size=32)
TIMM_NAMES = {
    "vit-b16": "vit_base_patch16_224",
    "vit-l16": "vit_large_patch16_224",
    "vit-h14": "vit_huge_patch14_224",
    "vit-g14": "vit_giant_patch14_224",
    "vit-G14": "vit_gigantic_patch14_224",
}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """Worst per-example relative L2 error."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)))


# ----------------------------------------------------------------------------------------------------
# timm reference

_TORCHVISION_SHIM: list = []


def _import_timm() -> types.ModuleType:
    """timm, or skip. timm imports torchvision, and PyPI's torchvision wheels are CUDA builds: next to
    a CPU-only torch their ops library cannot load and `import torchvision` then fails registering a
    fake kernel for the missing `torchvision::nms`. Declaring the two op schemas lets it import; timm's
    ViT never calls them."""
    torch = pytest.importorskip("torch")
    try:
        import timm
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SHIM.append(lib)  # the definitions live as long as the Library object
        import timm
    except ImportError:
        pytest.skip("timm is not installed")
    pytest.importorskip("safetensors")
    return timm


def _random_timm_vit(timm, seed: int = 0, **kwargs):
    """A timm ViT with every parameter perturbed (timm's init leaves biases 0 and LN scales 1)."""
    import torch

    torch.manual_seed(seed)
    kwargs.setdefault("num_classes", 0)
    model = timm.create_model(kwargs.pop("name", "vit_base_patch16_224"), pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _timm_features(model, images: np.ndarray, pool: str = "token") -> np.ndarray:
    import torch

    x = torch.from_numpy(((images.astype(np.float32) / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        tokens = model.forward_features(x)
        if pool == "gap":  # the Google codebases' "gap": final norm, then the mean of the patch tokens
            return tokens[:, 1:].mean(1).numpy()
        return model.forward_head(tokens, pre_logits=True).numpy()


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Depth-2 ViT-B/16 with random weights: its safetensors file, test images and timm's features."""
    timm = _import_timm()
    import safetensors.torch

    model = _random_timm_vit(timm, depth=2)
    path = tmp_path_factory.mktemp("vit") / "vit_b16_depth2.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    return types.SimpleNamespace(timm=timm, model=model, path=path, images=images,
                                 state=_state_dict(model), features=_timm_features(model, images))


@pytest.fixture(scope="module")
def apply_b16_depth2():
    """One compiled forward for every depth-2 ViT-B/16 checkpoint at 224 with token pooling."""
    return jax.jit(vit.make_apply(B16_DEPTH2))


# ----------------------------------------------------------------------------------------------------
# timm layout

def test_registered_configs_have_timms_shapes():
    timm = _import_timm()
    import torch

    for name, timm_name in TIMM_NAMES.items():
        with torch.device("meta"):  # shapes only: no memory, no init cost
            model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert got == expected_checkpoint_shapes(vit.get_config(name), "timm"), name


def test_safetensors_features_match_timm(ref):
    backbone = vit.make_backbone(B16_DEPTH2, str(ref.path))
    features = np.asarray(jax.jit(backbone.apply)(backbone.variables, ref.images))
    assert features.shape == (2, 768) and features.dtype == np.float32
    assert rel_err(features, ref.features) <= PARITY_RTOL

    # The rest of the Backbone contract.
    assert (backbone.feature_dim, backbone.image_size) == (768, 224)
    assert backbone.checkpoint_sha256 == hashlib.sha256(ref.path.read_bytes()).hexdigest()
    prepared = backbone.prepare(np.zeros((300, 451, 3), np.uint8))
    assert prepared.shape == (224, 224, 3) and prepared.dtype == np.uint8
    meta = json.loads(json.dumps(backbone.preprocessing))
    assert meta["normalize"]["mean"] == [0.5, 0.5, 0.5] and meta["pool"] == "token"
    assert meta["checkpoint_format"] == "timm" and meta["ignored_checkpoint_tensors"] == []


def test_full_size_checkpoint_through_the_registry(tmp_path):
    """Registered vit-b16 (12 blocks) from a file; the forward pass is checked at depth 2 above."""
    save_file = pytest.importorskip("safetensors.numpy").save_file
    rng = np.random.default_rng(0)
    path = tmp_path / "model.safetensors"
    save_file({k: rng.standard_normal(s, np.float32) for k, s in
               expected_checkpoint_shapes(vit.get_config("vit-b16"), "timm").items()}, str(path))
    backbone = load_backbone("vit-b16", str(path))
    assert (backbone.name, backbone.feature_dim, backbone.image_size) == ("vit-b16", 768, 224)
    assert len([k for k in backbone.variables["params"] if k.startswith("block")]) == 12
    out = jax.eval_shape(backbone.apply, backbone.variables, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8))
    assert (out.shape, out.dtype) == ((2, 768), jnp.float32)


def test_torch_pth_and_bfloat16_safetensors_load_the_same_tensors(ref, tmp_path):
    import safetensors.torch
    import torch

    want = vit_checkpoints.load_vit_checkpoint(ref.path, B16_DEPTH2).variables
    pth = tmp_path / "model.pth"
    torch.save(ref.model.state_dict(), pth)
    got = vit_checkpoints.load_vit_checkpoint(pth, B16_DEPTH2).variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)

    bf16 = tmp_path / "model_bf16.safetensors"
    safetensors.torch.save_file({k: v.to(torch.bfloat16) for k, v in ref.model.state_dict().items()}, str(bf16))
    got = vit_checkpoints.load_vit_checkpoint(bf16, B16_DEPTH2).variables
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-3), got, want)


def test_head_is_ignored_and_reported(ref):
    state = dict(ref.state, **{"head.weight": np.zeros((10, 768), np.float32), "head.bias": np.zeros(10, np.float32)})
    loaded = convert_checkpoint(state, B16_DEPTH2)
    assert loaded.ignored == ("head.bias", "head.weight")


# ----------------------------------------------------------------------------------------------------
# .npz layouts, written from the same weights

def _npz_attention(state: dict[str, np.ndarray], q: np.ndarray, qb: np.ndarray, k: np.ndarray, kb: np.ndarray,
                   v: np.ndarray, vb: np.ndarray, proj: str, heads: int, name: str) -> dict[str, np.ndarray]:
    """Flax MultiHeadDotProductAttention tensors from torch Linear weights (out, in)."""
    proj_w = state[proj + ".weight"]
    d = proj_w.shape[0]
    hd = d // heads
    out = {f"{name}/out/kernel": proj_w.T.reshape(heads, hd, d), f"{name}/out/bias": state[proj + ".bias"]}
    for n, w, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
        out[f"{name}/{n}/kernel"] = w.T.reshape(d, heads, hd)
        out[f"{name}/{n}/bias"] = b.reshape(heads, hd)
    return out


def _npz_from_timm(state: dict[str, np.ndarray], layout: str, depth: int, heads: int) -> dict[str, np.ndarray]:
    """The same weights as a vision_transformer / big_vision checkpoint (Flax layouts: Dense kernels
    (in, out); attention kernels per head, (D, H, d) and (H, d, D); conv kernels HWIO). A timm model
    without a class token (SigLIP) has none here either; its MAP head (`attn_pool`) becomes big_vision's
    `MAPHead_0`."""
    d = state["patch_embed.proj.weight"].shape[0]
    big_vision = layout.startswith("big_vision")
    prefix = "params/img/" if big_vision else ""
    attn, ln2, mlp = (("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0") if big_vision
                      else ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"))
    out = {
        "embedding/kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": state["patch_embed.proj.bias"],
        "Transformer/encoder_norm/scale": state["norm.weight"],
        "Transformer/encoder_norm/bias": state["norm.bias"],
        "head/kernel": np.ones((d, 5), np.float32),
        "head/bias": np.ones(5, np.float32),
    }
    if "cls_token" not in state:  # no class token: the position embedding covers the patches only
        out["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = state["pos_embed"]
    elif big_vision:  # big_vision adds pos_embedding to the patches only, then prepends cls
        out["cls"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embedding"] = state["pos_embed"][:, 1:]
    else:
        out["cls"] = state["cls_token"]
        out["Transformer/posembed_input/pos_embedding"] = state["pos_embed"]
    blocks = []
    for i in range(depth):
        t = f"blocks.{i}."
        q, k, v = np.split(state[t + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(state[t + "attn.qkv.bias"], 3)
        block = {
            "LayerNorm_0/scale": state[t + "norm1.weight"],
            "LayerNorm_0/bias": state[t + "norm1.bias"],
            **_npz_attention(state, q, qb, k, kb, v, vb, t + "attn.proj", heads, attn),
            f"{ln2}/scale": state[t + "norm2.weight"],
            f"{ln2}/bias": state[t + "norm2.bias"],
            f"{mlp}/Dense_0/kernel": state[t + "mlp.fc1.weight"].T,
            f"{mlp}/Dense_0/bias": state[t + "mlp.fc1.bias"],
            f"{mlp}/Dense_1/kernel": state[t + "mlp.fc2.weight"].T,
            f"{mlp}/Dense_1/bias": state[t + "mlp.fc2.bias"],
        }
        blocks.append(block)
    if layout == "big_vision_scan":
        out.update({f"Transformer/encoderblock/{n}": np.stack([b[n] for b in blocks]) for n in blocks[0]})
    else:
        out.update({f"Transformer/encoderblock_{i}/{n}": a for i, b in enumerate(blocks) for n, a in b.items()})
    if "attn_pool.latent" in state:
        a = "attn_pool."
        k, v = np.split(state[a + "kv.weight"], 2)
        kb, vb = np.split(state[a + "kv.bias"], 2)
        out.update({f"MAPHead_0/{n}": x for n, x in {
            "probe": state[a + "latent"],
            **_npz_attention(state, state[a + "q.weight"], state[a + "q.bias"], k, kb, v, vb, a + "proj", heads,
                             "MultiHeadDotProductAttention_0"),
            "LayerNorm_0/scale": state[a + "norm.weight"],
            "LayerNorm_0/bias": state[a + "norm.bias"],
            "MlpBlock_0/Dense_0/kernel": state[a + "mlp.fc1.weight"].T,
            "MlpBlock_0/Dense_0/bias": state[a + "mlp.fc1.bias"],
            "MlpBlock_0/Dense_1/kernel": state[a + "mlp.fc2.weight"].T,
            "MlpBlock_0/Dense_1/bias": state[a + "mlp.fc2.bias"],
        }.items()})
    out = {prefix + k: np.ascontiguousarray(a) for k, a in out.items()}
    if big_vision:  # the text tower of a two-tower model: skipped
        out["params/txt/Embed_0/embedding"] = np.zeros((7, 3), np.float32)
    return out


@pytest.mark.parametrize("layout", ["vision_transformer", "big_vision", "big_vision_scan"])
def test_npz_features_match_timm(ref, apply_b16_depth2, layout, tmp_path):
    path = tmp_path / f"{layout}.npz"
    np.savez(path, **_npz_from_timm(ref.state, layout, depth=2, heads=12))
    loaded = vit_checkpoints.load_vit_checkpoint(path, B16_DEPTH2)
    assert loaded.format == layout.removesuffix("_scan") and loaded.config == B16_DEPTH2
    prefix = "params/img/" if layout.startswith("big_vision") else ""
    assert set(loaded.ignored) >= {prefix + "head/kernel", prefix + "head/bias"}
    features = np.asarray(apply_b16_depth2(loaded.variables, ref.images))
    assert rel_err(features, ref.features) <= PARITY_RTOL


def test_npz_writer_agrees_with_timms_own_npz_loader(ref, tmp_path):
    """The vision_transformer layout the tests write is the one timm reads (its `_load_weights`)."""
    load_weights = getattr(sys.modules.get("timm.models.vision_transformer"), "_load_weights", None)
    if load_weights is None:
        pytest.skip("this timm has no vision_transformer._load_weights")
    path = tmp_path / "vit.npz"
    np.savez(path, **_npz_from_timm(ref.state, "vision_transformer", depth=2, heads=12))
    model = ref.timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    load_weights(model, str(path))
    assert rel_err(_timm_features(model, ref.images), ref.features) <= 1e-6


# ----------------------------------------------------------------------------------------------------
# Pooling, resolution, precision

def test_gap_pool_is_the_mean_of_normalised_patch_tokens(ref):
    backbone = vit.make_backbone(B16_DEPTH2, str(ref.path), pool="gap")
    features = np.asarray(jax.jit(backbone.apply)(backbone.variables, ref.images))
    assert rel_err(features, _timm_features(ref.model, ref.images, pool="gap")) <= PARITY_RTOL


def test_pos_embed_resize_matches_timm_at_another_resolution(ref):
    from timm.layers import resample_abs_pos_embed

    size = 160  # grid 14 -> 10
    backbone = vit.make_backbone(B16_DEPTH2, str(ref.path), image_size=size)
    assert backbone.image_size == size and backbone.variables["params"]["pos_embed"].shape == (1, 101, 768)
    images = ref.images[:, :size, :size]
    features = np.asarray(jax.jit(backbone.apply)(backbone.variables, images))
    assert np.all(np.isfinite(features))

    model = ref.timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, depth=2,
                                  img_size=size).eval()
    state = {k: v.clone() for k, v in ref.model.state_dict().items()}
    state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=(10, 10), num_prefix_tokens=1,
                                                interpolation="bilinear", antialias=False)
    model.load_state_dict(state)
    assert rel_err(features, _timm_features(model, images)) <= PARITY_RTOL


def test_bfloat16_variables_stay_close_to_float32(ref):
    backbone = vit.make_backbone(B16_DEPTH2, str(ref.path))
    bf16 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), backbone.variables)
    features = np.asarray(jax.jit(backbone.apply)(bf16, ref.images))
    assert features.dtype == np.float32 and np.all(np.isfinite(features))
    assert rel_err(features, ref.features) < BF16_RTOL


def test_resize_matrix_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    grid = np.random.default_rng(0).normal(size=(7, 7, 5)).astype(np.float32)
    for size in (4, 7, 10, 24):
        want = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(size, size),
                                               mode="bilinear", align_corners=False, antialias=False)
        np.testing.assert_allclose(resize_pos_embed(grid, size), want[0].permute(1, 2, 0).numpy(),
                                   rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Numpy-only: synthetic checkpoints of a tiny ViT

def _synthetic(config: vit.ViTConfig, layout: str = "timm", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.normal(size=s)).astype(np.float32)
            for k, s in expected_checkpoint_shapes(config, layout).items()}


_tiny_apply = jax.jit(vit.make_apply(TINY))


@pytest.mark.parametrize("layout", ["timm", "vision_transformer", "big_vision", "big_vision_scan"])
def test_every_layout_loads_and_runs(layout):
    loaded = convert_checkpoint(_synthetic(TINY, layout), TINY)
    assert loaded.config == TINY and loaded.ignored == ()
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    features = np.asarray(_tiny_apply(loaded.variables, images))
    assert features.shape == (3, 64) and np.all(np.isfinite(features))


def test_resize_matrix_properties():
    for n_in, n_out in ((4, 4), (3, 8), (9, 5), (1, 3)):
        m = linear_resize_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(axis=1), 1.0)  # constants are kept
        assert np.all(m >= 0)
    np.testing.assert_array_equal(linear_resize_matrix(6, 6), np.eye(6))
    # Upsampling by 2: interior samples sit at quarter points between neighbours.
    np.testing.assert_allclose(linear_resize_matrix(2, 4) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])


def test_checkpoint_grid_sets_the_default_resolution():
    big = dataclasses.replace(TINY, image_size=48)  # a 6x6 grid checkpoint
    loaded = convert_checkpoint(_synthetic(big), TINY)
    assert loaded.config.image_size == 48 and loaded.checkpoint_image_size == 48
    loaded = convert_checkpoint(_synthetic(big), TINY, image_size=32)
    assert loaded.config.image_size == 32 and loaded.variables["params"]["pos_embed"].shape == (1, 17, 64)


def test_missing_unexpected_and_mismatched_tensors_are_all_reported():
    state = _synthetic(TINY)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.ls1.gamma"] = np.ones(64, np.float32)
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"][:127]
    with pytest.raises(ViTCheckpointError) as err:
        convert_checkpoint(state, TINY)
    message = str(err.value)
    assert "missing from checkpoint: blocks.1.mlp.fc2.bias" in message
    assert "unexpected checkpoint tensors: blocks.0.ls1.gamma" in message
    assert "blocks.0.mlp.fc1.weight (127, 64) (expected (128, 64))" in message
    assert isinstance(err.value, BackboneError)


def test_wrong_variant_names_the_checkpoints_shape():
    with pytest.raises(ViTCheckpointError, match=r"does not match vit-b16(.|\n)*width 64, depth 2, patch 8"):
        convert_checkpoint(_synthetic(TINY), vit.get_config("vit-b16"))


def test_posemb_and_pooling_errors():
    state = _synthetic(TINY)
    state["pos_embed"] = state["pos_embed"][:, :15]
    with pytest.raises(ViTCheckpointError, match="neither a square grid"):
        convert_checkpoint(state, TINY)
    no_cls = _synthetic(dataclasses.replace(TINY, class_token=False, pool="gap"))
    assert convert_checkpoint(no_cls, TINY).config.pool == "gap"
    with pytest.raises(ViTCheckpointError, match="class token"):
        convert_checkpoint(no_cls, TINY, pool="token")
    with pytest.raises(ViTCheckpointError, match="multiple of the patch size"):
        convert_checkpoint(_synthetic(TINY), TINY, image_size=30)


def test_registered_vits_need_a_checkpoint(tmp_path):
    specs = backbone_specs()
    for name in ("vit-b16", "vit-l16", "vit-h14", "vit-g14", "vit-G14"):
        config = vit.get_config(name)
        assert (specs[name].feature_dim, specs[name].image_size) == (config.width, 224)
        with pytest.raises(BackboneError, match="--checkpoint PATH"):
            specs[name].load(None)
    with pytest.raises(BackboneError) as err:
        load_backbone("vit-b16")
    assert "vit_models/augreg/B_16" in str(err.value) and "timm/vit_base_patch16_224" in str(err.value)
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("vit-b16", str(tmp_path / "absent.npz"))


def test_unreadable_and_foreign_files(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ViTCheckpointError, match="cannot read"):
        load_backbone("vit-b16", str(junk))
    foreign = tmp_path / "resnet.npz"
    np.savez(foreign, **{"conv1/kernel": np.zeros((7, 7, 3, 64), np.float32)})
    with pytest.raises(ViTCheckpointError, match="not a ViT checkpoint"):
        load_backbone("vit-b16", str(foreign))


# ----------------------------------------------------------------------------------------------------
# Attention: fused QKV through jax.nn.dot_product_attention

def _reference_attention_block(params: dict, x: np.ndarray, heads: int) -> np.ndarray:
    """The attention sublayer as it was before the fused projection: separate q, k, v projections and
    an explicit float64 softmax."""
    x = np.asarray(x, np.float64)
    kernel, bias = np.asarray(params["qkv"]["kernel"], np.float64), np.asarray(params["qkv"]["bias"], np.float64)
    q, k, v = (np.einsum("ntd,dhe->nthe", x, kernel[:, i]) + bias[i] for i in range(3))
    logits = np.einsum("nthe,nshe->nhts", q, k) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    y = np.einsum("nhts,nshe->nthe", probs, v)
    return np.einsum("nthe,hed->ntd", y, np.asarray(params["out"]["kernel"], np.float64)) + params["out"]["bias"]


def test_fused_qkv_attention_matches_separate_projections():
    from featdp.extraction.backbones.vit import _Attention

    x = np.random.default_rng(0).normal(size=(2, 17, 64)).astype(np.float32)
    module = _Attention(num_heads=4, dtype=jnp.float32)
    params = module.init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape), params)
    got = np.asarray(jax.jit(module.apply)({"params": params}, x))
    assert rel_err(got.reshape(-1, 64), _reference_attention_block(params, x, 4).reshape(-1, 64)) <= 1e-5


def test_attention_implementation_choice(monkeypatch):
    monkeypatch.delenv("FEATDP_ATTENTION", raising=False)
    assert vit.attention_implementation(jnp.float32, 64) == "xla"
    assert vit.attention_implementation(jnp.bfloat16, 64) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    monkeypatch.setenv("FEATDP_ATTENTION", "xla")
    assert vit.attention_implementation(jnp.bfloat16, 64) == "xla"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the fallback where cuDNN is absent")
def test_forced_cudnn_falls_back_to_xla_without_a_gpu(monkeypatch):
    q = jax.random.normal(jax.random.key(0), (2, 9, 3, 8), jnp.bfloat16)
    want = np.asarray(vit.attention(q, q, q), np.float32)
    monkeypatch.setenv("FEATDP_ATTENTION", "cudnn")
    vit._FALLBACK_WARNED.clear()
    with pytest.warns(RuntimeWarning, match="cuDNN attention unavailable"):
        got = np.asarray(vit.attention(q, q, q), np.float32)
    np.testing.assert_array_equal(got, want)
