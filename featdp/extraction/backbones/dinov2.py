"""DINOv2 (Oquab et al., 2023), with and without registers (Darcet et al., 2024), on the ViT module.

| backbone             | width | depth | heads | MLP           | feature: cls ‖ mean patch | `-cls` |
|----------------------|-------|-------|-------|---------------|---------------------------|--------|
| `dinov2-vit-s14`     | 384   | 12    | 6     | 1536          | 768                       | 384    |
| `dinov2-vit-b14`     | 768   | 12    | 12    | 3072          | 1536                      | 768    |
| `dinov2-vit-l14`     | 1024  | 24    | 16    | 4096          | 2048                      | 1024   |
| `dinov2-vit-g14`     | 1536  | 40    | 24    | SwiGLU 2×4096 | 3072                      | 1536   |

`-reg` (e.g. `dinov2-vit-b14-reg`, `dinov2-vit-b14-reg-cls`): the models trained with 4 register tokens.

Architecture (facebookresearch/dinov2 `DinoVisionTransformer`, timm's `vit_*_patch14[_reg4]_dinov2`):
patch 14 with bias, class token, position embedding over the class token and the patches, the register
tokens inserted after the class token without one, pre-norm blocks with layer scale on both branches
(`ls1`, `ls2`), LayerNorm epsilon 1e-6, exact GELU; ViT-g's MLP is SwiGLU (fc1 packs both branches,
silu(a)·b, 4096 wide each).

Feature: by default the class token ‖ the mean of the patch tokens (registers left out), both after
the final LayerNorm: the input of DINOv2's own linear classifiers (`dinov2_vit*14_lc`, and the
paper's linear evaluation). `-cls`: the class token alone (timm's `forward_head(pre_logits=True)`).

Preprocessing (DINOv2's evaluation transform): resize the shorter side to 256 (bicubic), center crop
224 (here: the central 224/256 of the shorter side, resized once), ImageNet mean (0.485, 0.456, 0.406)
and std (0.229, 0.224, 0.225). Resolution: 224 whatever the checkpoint (the released ones are at 518,
a 37×37 grid): the position embedding is resampled bicubically as DINOv2's `interpolate_pos_encoding`
does at run time (torch bicubic, scale factor (16 + 0.1)/37, no antialiasing), so the features are
those its models give on 224 inputs.

Checkpoints: timm `model.safetensors` (`timm/vit_*_patch14_dinov2.lvd142m`) or the original `.pth`
(`dinov2_vit*14[_reg4]_pretrain.pth`; `mask_token` skipped).
"""

from __future__ import annotations

import dataclasses

from featdp.extraction.backbones.vit import ViTConfig, register_vit

__all__ = ["CONFIGS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_COMMON = dict(patch_size=14, image_size=224, class_token=True, pool="token+gap", layer_scale=True,
               mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_fraction=224 / 256, pos_resize="bicubic_dinov2",
               resolution_from_checkpoint=False)
_SHAPES = {  # name: (width, depth, heads, mlp_dim, activation, timm name, original file)
    "s": (384, 12, 6, 1536, "gelu", "vit_small_patch14", "dinov2_vits14"),
    "b": (768, 12, 12, 3072, "gelu", "vit_base_patch14", "dinov2_vitb14"),
    "l": (1024, 24, 16, 4096, "gelu", "vit_large_patch14", "dinov2_vitl14"),
    "g": (1536, 40, 24, 4096, "swiglu", "vit_giant_patch14", "dinov2_vitg14"),
}


def _configs() -> dict[str, tuple[ViTConfig, str, str]]:
    out = {}
    for size, (width, depth, heads, mlp, act, timm, original) in _SHAPES.items():
        for reg in (False, True):
            for cls in (False, True):
                name = f"dinov2-vit-{size}14" + ("-reg" if reg else "") + ("-cls" if cls else "")
                config = ViTConfig(name, width=width, depth=depth, num_heads=heads, mlp_dim=mlp, activation=act,
                                   num_registers=4 if reg else 0, **_COMMON)
                if cls:
                    config = dataclasses.replace(config, pool="token")
                hub = f"timm/{timm}_{'reg4_' if reg else ''}dinov2.lvd142m"
                url = (f"https://dl.fbaipublicfiles.com/dinov2/{original}/{original}"
                       f"{'_reg4' if reg else ''}_pretrain.pth")
                out[name] = (config, hub, url)
    return out


_ALL = _configs()
CONFIGS: dict[str, ViTConfig] = {name: c for name, (c, _, _) in _ALL.items()}


def _register() -> None:
    for name, (config, hub, url) in _ALL.items():
        register_vit(
            config, f"hf-hub:{hub}, or DINOv2's .pth",
            f"no weights ship; pass --checkpoint hf-hub:{hub} (timm), optionally @REVISION to pin it, "
            f"or a local timm model.safetensors or DINOv2's own {url}")


_register()
