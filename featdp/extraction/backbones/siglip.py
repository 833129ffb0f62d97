"""SigLIP image towers (Zhai et al., 2023) on the ViT module: MAP-head pooling.

| backbone          | width | depth | heads | MLP  | patch | feature        |
|-------------------|-------|-------|-------|------|-------|----------------|
| `siglip-vit-b16`  | 768   | 12    | 12    | 3072 | 16    | MAP head: 768  |
| `siglip-so400m14` | 1152  | 27    | 16    | 4304 | 14    | MAP head: 1152 |

Architecture (big_vision's `vit` with `pool_type="map"`, timm's `vit_*_siglip_*`): patch embedding with
bias, no class token, position embedding over the patches, pre-norm blocks, final LayerNorm (epsilon
1e-6), then the MAP head: a learned probe attends over all tokens (multihead, the tower's heads), and
x += MLP(LayerNorm(x)); the feature is that one pooled token, the image embedding SigLIP compares with
text (SigLIP's image tower has no projection after it; a `head` in the file, if any, is skipped).

Activation: GELU in its tanh form, as big_vision (`flax.linen.gelu`) trained it and transformers
evaluates it (`gelu_pytorch_tanh`); timm and OpenCLIP build these towers with exact GELU (features move by
≈ 3e-4 relative on a random SigLIP B/16; `make_backbone(..., gelu_approximate=False)` gives timm's).

Preprocessing (big_vision's `resize(224)|value_range(-1, 1)`, OpenCLIP's `resize_mode="squash"`,
transformers' `SiglipImageProcessor`): the whole image resized to 224×224, aspect ratio not kept,
bicubic; pixels to [-1, 1] (mean = std = 0.5). Resolution: the checkpoint's (224, 256, 384, ...; a
so400m "384" checkpoint has a 27×27 grid and runs at 378, as timm's `_378` models do).

Checkpoints: big_vision `.npz` (`params/img/...`, plain or scanned), timm `model.safetensors`
(`timm/vit_*_siglip_*` repositories), OpenCLIP's (`visual.trunk.*`, e.g. `timm/ViT-B-16-SigLIP`).
"""

from __future__ import annotations

from featdp.extraction.backbones.vit import ViTConfig, register_vit

__all__ = ["CONFIGS"]

_COMMON = dict(class_token=False, pool="map", gelu_approximate=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
               crop_fraction=0.0, pos_resize="bicubic")
CONFIGS: dict[str, ViTConfig] = {c.name: c for c in (
    ViTConfig("siglip-vit-b16", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, **_COMMON),
    ViTConfig("siglip-so400m14", width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, **_COMMON),
)}

_BV = "https://storage.googleapis.com/big_vision/siglip"
_SOURCES = {
    "siglip-vit-b16": ("timm/vit_base_patch16_siglip_224.webli", "timm/ViT-B-16-SigLIP",
                       f"{_BV}/webli_en_b16_224_63724782.npz"),
    "siglip-so400m14": ("timm/vit_so400m_patch14_siglip_224.webli", "timm/ViT-SO400M-14-SigLIP",
                        f"{_BV}/webli_en_so400m_224_57633886.npz"),
}


def _register() -> None:
    for name, config in CONFIGS.items():
        timm, open_clip, npz = _SOURCES[name]
        register_vit(
            config, f"hf-hub:{timm}, or a big_vision .npz / timm .safetensors",
            f"no weights ship; pass --checkpoint hf-hub:{timm} (timm) or hf-hub:{open_clip} (OpenCLIP), "
            f"optionally @REVISION to pin it, or a local big_vision .npz (e.g. {npz}) or timm model.safetensors")


_register()
