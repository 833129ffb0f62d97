"""Vision Transformer (Dosovitskiy et al., 2021) as a Flax linen backbone for pretrained checkpoints.

    uint8 (N, R, R, 3) --> (pixels/255 − 0.5)/0.5 --> p×p patches, linear (a stride-p conv)
    --> [class token] + learned position embeddings --> L × pre-norm block --> LayerNorm
    --> pooled: the class token ("token") or the mean of the patch tokens ("gap")

    block:  x += Attn(LN1(x));  x += MLP(LN2(x)),  MLP = Dense(mlp_dim) → GELU → Dense(width)

The pooled "token" feature is what timm's `VisionTransformer.forward_head(pre_logits=True)` returns
with `global_pool="token"`: the class token after the final LayerNorm, before any classifier. "gap" is
the Google code's (vision_transformer, big_vision) `classifier="gap"`: the final LayerNorm, then the mean
over the patch tokens (the class token, if any, is left out). timm's own "avg" pooling differs: it
skips the final norm and normalises the mean with a separate `fc_norm`; such checkpoints are refused
by the loader (unexpected `fc_norm.*`).

| backbone  | width | depth | heads | MLP  | patch | params |
|-----------|-------|-------|-------|------|-------|--------|
| `vit-b16` | 768   | 12    | 12    | 3072 | 16    | 86 M   |
| `vit-l16` | 1024  | 24    | 16    | 4096 | 16    | 304 M  |
| `vit-h14` | 1280  | 32    | 16    | 5120 | 14    | 632 M  |
| `vit-g14` | 1408  | 40    | 16    | 6144 | 14    | 1.0 B  |
| `vit-G14` | 1664  | 48    | 16    | 8192 | 14    | 1.8 B  |

ViT-g/14 and ViT-G/14 are the "giant" and "gigantic" shapes of Zhai et al., "Scaling Vision
Transformers" (big_vision's variants "g" and "G"; timm's `vit_giant_patch14_224` and
`vit_gigantic_patch14_224`). The paper's weights are not public; these two take any checkpoint of
that shape in a layout the loader reads.

Choices:
* Weights only from `--checkpoint`: nothing ships offline. Formats (featdp.backbones.vit_checkpoints):
  google-research/vision_transformer and big_vision `.npz`, timm `.safetensors` or torch state dicts.
* Resolution: by default the checkpoint's own, from the length of its position embedding (224 for the
  usual checkpoints, 384 for the "res_384" fine-tunes); another size resamples the embedding grid
  bilinearly, as timm does when it loads these `.npz` files.
* Pixels: mean = std = 0.5 per colour, i.e. [-1, 1]; the Google training code's input range, and what
  timm (1.0.31) states in the pretrained_cfg of these weights (e.g. `vit_base_patch16_224.augreg2_in21k_ft_in1k` and
  `.augreg_in21k_ft_in1k`: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5), crop_pct 0.9, bicubic). Crop:
  the central 0.9 of the shorter side, bicubic resize (timm's evaluation transform).
* GELU is the exact (erf) form, as in timm, whose ports of the Google weights reproduce the papers'
  accuracies; the JAX training code used the tanh approximation (`flax.linen.gelu`).
  `ViTConfig.gelu_approximate=True` selects it (features moved by 2e-4 relative on a random
  depth-2 ViT-B/16).
* Precision: matmuls and the patch convolution run in the variables' dtype (bfloat16 on accelerators),
  the residual stream, LayerNorms and the attention softmax in float32 (`jax.nn.dot_product_attention`
  accumulates its logits in float32), and the features come out as float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from featdp.backbones.pil_preprocessing import center_crop_resize
from featdp.backbones.registry import Backbone, BackboneError, BackboneSpec, register_backbone

__all__ = [
    "CONFIGS",
    "LN_EPSILON",
    "MEAN_RGB",
    "POOLS",
    "STD_RGB",
    "ViT",
    "ViTConfig",
    "checkpoint_sources",
    "get_config",
    "make_apply",
    "make_backbone",
]

LN_EPSILON = 1e-6  # flax LayerNorm's default, which the Google checkpoints were trained with
MEAN_RGB = (0.5, 0.5, 0.5)
STD_RGB = (0.5, 0.5, 0.5)
CROP_FRACTION = 0.9
POOLS = ("token", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of one ViT plus its pooling; `image_size` is the default resolution."""

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int = 224
    class_token: bool = True
    pool: str = "token"
    gelu_approximate: bool = False

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("pool='token' needs class_token=True")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2 + int(self.class_token)


CONFIGS: dict[str, ViTConfig] = {
    c.name: c
    for c in (
        ViTConfig("vit-b16", width=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
        ViTConfig("vit-l16", width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=16),
        ViTConfig("vit-h14", width=1280, depth=32, num_heads=16, mlp_dim=5120, patch_size=14),
        ViTConfig("vit-g14", width=1408, depth=40, num_heads=16, mlp_dim=6144, patch_size=14),
        ViTConfig("vit-G14", width=1664, depth=48, num_heads=16, mlp_dim=8192, patch_size=14),
    )
}


def get_config(name: str) -> ViTConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise BackboneError(f"unknown ViT {name!r}; choose one of {sorted(CONFIGS)}") from None


# Public files per backbone: (vision_transformer / big_vision .npz, timm hub repository).
_GCS = "https://storage.googleapis.com/vit_models"
_SOURCES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vit-b16": (
        (f"{_GCS}/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz",
         f"{_GCS}/imagenet21k/ViT-B_16.npz"),
        ("timm/vit_base_patch16_224.augreg2_in21k_ft_in1k", "timm/vit_base_patch16_224.augreg_in21k")),
    "vit-l16": (
        (f"{_GCS}/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz",
         f"{_GCS}/imagenet21k/ViT-L_16.npz"),
        ("timm/vit_large_patch16_224.augreg_in21k_ft_in1k", "timm/vit_large_patch16_224.augreg_in21k")),
    "vit-h14": (
        (f"{_GCS}/imagenet21k/ViT-H_14.npz",),
        ("timm/vit_huge_patch14_224.orig_in21k",)),
}


_SHORT_SOURCE = "none ship; --checkpoint: vision_transformer/big_vision .npz or timm .safetensors"


def checkpoint_sources(name: str) -> str:
    """Where to get weights for backbone `name`, for `featdp backbones` and the load(None) error."""
    if name not in _SOURCES:
        return ("no public checkpoint of this shape; pass --checkpoint PATH to a big_vision/"
                "vision_transformer .npz or a timm .safetensors of this shape")
    npz, timm = _SOURCES[name]
    return ("no weights ship; pass --checkpoint PATH to a vision_transformer .npz (e.g. "
            + " or ".join(npz) + ") or a timm model.safetensors (hub repositories "
            + ", ".join(timm) + ")")


def _layer_norm(name: str) -> nn.LayerNorm:
    # dtype float32: statistics and output in float32 whatever the parameters' dtype.
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=jnp.float32, name=name)


class _Attention(nn.Module):
    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        heads = functools.partial(
            nn.DenseGeneral, features=(self.num_heads, width // self.num_heads), dtype=self.dtype)
        q, k, v = (heads(name=n)(x) for n in ("query", "key", "value"))  # (N, T, H, head_dim)
        # XLA implementation: logits and softmax in float32, probabilities cast back for the value matmul.
        y = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(y)


class _Block(nn.Module):
    config: ViTConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        y = _layer_norm("norm1")(x).astype(self.dtype)
        x = x + _Attention(c.num_heads, self.dtype, name="attn")(y).astype(x.dtype)
        y = _layer_norm("norm2")(x).astype(self.dtype)
        y = nn.Dense(c.mlp_dim, dtype=self.dtype, name="fc1")(y)
        y = nn.gelu(y, approximate=c.gelu_approximate)
        y = nn.Dense(c.width, dtype=self.dtype, name="fc2")(y)
        return x + y.astype(x.dtype)


class ViT(nn.Module):
    """Normalised images (N, R, R, 3) -> pooled float32 features (N, width).

    `dtype` is the compute dtype of the matmuls (normally that of the variables); the residual stream,
    LayerNorms and softmax stay in float32. Variables: {"params": {patch_embed, cls_token, pos_embed,
    block{i}: {norm1, attn: {query, key, value, out}, norm2, fc1, fc2}, norm}}.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        p = c.patch_size
        if images.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"{c.name} expects (N, {c.image_size}, {c.image_size}, 3) images, "
                             f"got {images.shape}")
        x = nn.Conv(c.width, (p, p), strides=p, padding="VALID", dtype=self.dtype,
                    name="patch_embed")(images.astype(self.dtype))
        n = x.shape[0]
        x = x.reshape(n, -1, c.width).astype(jnp.float32)  # row-major over the grid, like timm's flatten
        if c.class_token:
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.width))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c.width)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, c.num_tokens, c.width))
        x = x + pos.astype(x.dtype)
        for i in range(c.depth):
            x = _Block(c, self.dtype, name=f"block{i}")(x)
        x = _layer_norm("norm")(x)
        if c.pool == "token":
            return x[:, 0]
        return jnp.mean(x[:, int(c.class_token):], axis=1)


def make_apply(config: ViTConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """The registry's `apply`: uint8 (N, R, R, 3) -> float32 (N, width), computing in the variables' dtype."""
    mean = jnp.asarray(MEAN_RGB, jnp.float32)
    std = jnp.asarray(STD_RGB, jnp.float32)

    def apply(variables: Any, images: jax.Array) -> jax.Array:
        dtype = variables["params"]["patch_embed"]["kernel"].dtype
        x = (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std
        return ViT(config, dtype=dtype).apply(variables, x)

    return apply


def _preprocessing(config: ViTConfig, info: Any) -> dict:
    size = config.image_size
    return {
        "crop": f"central {CROP_FRACTION} of the shorter side",
        "resize": f"{size}x{size} bicubic (Pillow)",
        "normalize": {"mean": list(MEAN_RGB), "std": list(STD_RGB), "scale": "pixels/255"},
        "pool": config.pool,
        "gelu": "tanh approximation" if config.gelu_approximate else "exact (erf)",
        "checkpoint_format": info.format,
        "checkpoint_image_size": info.checkpoint_image_size,
        "pos_embed": (f"resampled bilinearly from {info.checkpoint_image_size // config.patch_size}^2 "
                      f"to {config.grid_size}^2" if info.checkpoint_image_size != size else "as stored"),
        "ignored_checkpoint_tensors": list(info.ignored),
    }


def make_backbone(config: ViTConfig | str, checkpoint: str | None, image_size: int | None = None,
                  pool: str | None = None, gelu_approximate: bool | None = None) -> Backbone:
    """A `Backbone` from a checkpoint file; the architecture is `config`, checked against the file.

    `image_size` None: the checkpoint's own resolution. `pool` None: "token" when the checkpoint has a
    class token, else "gap".
    """
    from featdp.backbones import vit_checkpoints

    config = get_config(config) if isinstance(config, str) else config
    loaded = vit_checkpoints.load_vit_checkpoint(
        checkpoint, config, image_size=image_size, pool=pool, gelu_approximate=gelu_approximate)
    cfg = loaded.config
    return Backbone(
        name=config.name,
        feature_dim=cfg.width,
        image_size=cfg.image_size,
        variables=loaded.variables,
        apply=make_apply(cfg),
        prepare=functools.partial(center_crop_resize, size=cfg.image_size, crop_fraction=CROP_FRACTION),
        checkpoint=str(loaded.path),
        checkpoint_sha256=loaded.sha256,
        preprocessing=_preprocessing(cfg, loaded),
    )


def _register() -> None:
    for name, config in CONFIGS.items():
        register_backbone(BackboneSpec(
            name=name, feature_dim=config.width, image_size=config.image_size,
            checkpoint_source=_SHORT_SOURCE + (f", e.g. {_SOURCES[name][1][0]}" if name in _SOURCES else ""),
            load=functools.partial(make_backbone, name),
        ))


_register()
