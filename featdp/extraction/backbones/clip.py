"""CLIP image towers (Radford et al., 2021): OpenAI's weights and OpenCLIP's, on the ViT module.

| backbone            | width | depth | heads | MLP  | patch | feature                          |
|---------------------|-------|-------|-------|------|-------|----------------------------------|
| `clip-vit-b16`      | 768   | 12    | 12    | 3072 | 16    | class token, before the proj: 768 |
| `clip-vit-b16-proj` | 768   | 12    | 12    | 3072 | 16    | after the projection: 512        |
| `clip-vit-l14`      | 1024  | 24    | 16    | 4096 | 14    | class token, before the proj: 1024 |
| `clip-vit-l14-proj` | 1024  | 24    | 16    | 4096 | 14    | after the projection: 768        |

Architecture (OpenAI's `VisionTransformer`, OpenCLIP's, timm's `vit_*_clip_*`): patch embedding without
bias, class token, position embedding, LayerNorm `ln_pre` before the blocks, pre-norm blocks,
`ln_post` on the class token; LayerNorm epsilon 1e-5 (torch's default, which CLIP trained with).
The image embedding is `ln_post(x[:, 0]) @ proj`; linear probes on CLIP (the paper's, and most since)
use the class token before the projection, the `-proj` backbones give the embedding after it (the
one compared with text).

Activation: OpenAI trained with QuickGELU, x·σ(1.702x); OpenCLIP's LAION/DataComp models with exact
GELU, its `-quickgelu` ones (MetaCLIP, DFN, ...) with QuickGELU. The weights do not say which, so the
loader reads the metadata beside them: OpenCLIP's `open_clip_config.json` (`model_cfg.quick_gelu`), or
timm's `config.json` (a `quickgelu` architecture, or an `openai` tag); an `hf-hub:` checkpoint brings
these files along. Without either, or an `openai` repository name, it assumes QuickGELU and warns.
The choice and why are recorded in the feature file (`preprocessing.activation[_source]`).

Preprocessing (OpenAI's and OpenCLIP's evaluation transform): resize the shorter side to 224 (bicubic),
center crop 224 (here: the central square, resized once), mean (0.48145466, 0.4578275, 0.40821073),
std (0.26862954, 0.26130258, 0.27577711). Resolution: the checkpoint's (224, or 336 for
`ViT-L/14@336px`); another resamples the position embedding bicubically.

Checkpoints: timm (`model.safetensors` of `timm/vit_*_clip_*` repositories: the projection is `head`),
OpenCLIP (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`: `visual.*`, the text tower
skipped) or a state dict of OpenAI's model in the same `visual.*` names. OpenAI's original
`ViT-B-16.pt` files are TorchScript archives, which the torch-free reader does not take: use the
same weights from `hf-hub:timm/vit_base_patch16_clip_224.openai`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings

from featdp.extraction.backbones.vit import ViTConfig, make_backbone, register_vit

__all__ = ["CLIP_MEAN", "CLIP_STD", "CONFIGS", "clip_activation"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_COMMON = dict(class_token=True, pool="token", activation="quick_gelu", ln_epsilon=1e-5, patch_bias=False,
               pre_norm=True, mean=CLIP_MEAN, std=CLIP_STD, crop_fraction=1.0, pos_resize="bicubic")
_B16 = ViTConfig("clip-vit-b16", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16, **_COMMON)
_L14 = ViTConfig("clip-vit-l14", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14, **_COMMON)
CONFIGS: dict[str, ViTConfig] = {c.name: c for c in (
    _B16, dataclasses.replace(_B16, name="clip-vit-b16-proj", projection_dim=512),
    _L14, dataclasses.replace(_L14, name="clip-vit-l14-proj", projection_dim=768),
)}

_HUB = {
    "clip-vit-b16": ("timm/vit_base_patch16_clip_224.openai", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "clip-vit-l14": ("timm/vit_large_patch14_clip_224.openai", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K"),
}


def clip_activation(file) -> tuple[str, str]:
    """("quick_gelu" | "gelu", why) for a resolved checkpoint file, from the metadata beside it."""
    directory = file.directory
    open_clip_config = directory / "open_clip_config.json"
    if open_clip_config.is_file():
        try:
            quick = bool(json.loads(open_clip_config.read_text()).get("model_cfg", {}).get("quick_gelu", False))
        except (ValueError, AttributeError) as error:
            raise _error(f"cannot read {open_clip_config}: {error}") from None
        return ("quick_gelu" if quick else "gelu"), f"open_clip_config.json: model_cfg.quick_gelu = {str(quick).lower()}"
    timm_config = directory / "config.json"
    if timm_config.is_file():
        try:
            config = json.loads(timm_config.read_text())
        except ValueError as error:
            raise _error(f"cannot read {timm_config}: {error}") from None
        architecture = str(config.get("architecture", ""))
        tag = str((config.get("pretrained_cfg") or {}).get("tag", ""))
        if "quickgelu" in architecture:
            return "quick_gelu", f"config.json: architecture {architecture}"
        if "openai" in tag:
            return "quick_gelu", f"config.json: pretrained tag {tag!r} (natively QuickGELU)"
        if "clip" in architecture:
            return "gelu", f"config.json: architecture {architecture}, tag {tag!r}"
    repo = (file.hub or {}).get("repo_id", "")
    if "openai" in repo.lower():
        return "quick_gelu", f"repository {repo} (OpenAI weights)"
    warnings.warn(f"{file.name}: no open_clip_config.json or CLIP config.json beside the weights to say which "
                  "activation they were trained with; assuming QuickGELU (OpenAI CLIP). LAION/DataComp OpenCLIP "
                  "weights use GELU: put the repository's open_clip_config.json beside the checkpoint, or load it "
                  "with --checkpoint hf-hub:ORG/NAME", UserWarning, stacklevel=2)
    return "quick_gelu", "assumed (no metadata beside the checkpoint)"


def _error(message: str):
    from featdp.extraction.backbones.vit_checkpoints import ViTCheckpointError

    return ViTCheckpointError(message)


def _register() -> None:
    for name, config in CONFIGS.items():
        openai, laion = _HUB[name.removesuffix("-proj")]
        short = f"hf-hub:{openai} (OpenAI), hf-hub:{laion}, or a timm/OpenCLIP file"
        long = (f"no weights ship; pass --checkpoint hf-hub:{openai} (OpenAI's weights, timm's copy) or "
                f"hf-hub:{laion} (OpenCLIP, LAION-2B), optionally @REVISION to pin it, or a local timm "
                "model.safetensors / OpenCLIP open_clip_model.safetensors or open_clip_pytorch_model.bin "
                "(with its open_clip_config.json beside it, which says whether the model uses QuickGELU)")
        register_vit(config, short, long,
                     load=functools.partial(make_backbone, config, activation=clip_activation))


_register()
