"""Vision Transformer (Dosovitskiy et al., 2021) as a Flax linen backbone for pretrained checkpoints.

One module covers the supervised ViTs registered here and the image towers of the other ViT families
(CLIP, SigLIP, DINOv2: featdp.extraction.backbones.clip, .siglip, .dinov2), which differ only in the switches of
`ViTConfig`:

    uint8 (N, R, R, 3) --> (pixels/255 − mean)/std --> p×p patches, linear (a stride-p conv)
    --> [class token] + learned position embeddings --> [register tokens] --> [LayerNorm "norm_pre"]
    --> L × pre-norm block --> LayerNorm --> pooled --> [linear projection "head"]

    block:  x += ls1 · Attn(LN1(x));  x += ls2 · MLP(LN2(x))
            MLP = Dense(mlp_dim) → GELU | QuickGELU → Dense(width), or SwiGLU: Dense(2·mlp_dim) → silu(a)·b
            → Dense(width);  ls1, ls2: per-channel layer scale (DINOv2), else 1

Pools: "token", the class token after the final LayerNorm (timm's `forward_head(pre_logits=True)` with
`global_pool="token"`); "gap", the Google codebases' `classifier="gap"`: the mean over the patch tokens
after the final LayerNorm (class and register tokens left out; timm's own "avg" pooling differs: it
skips the final norm and normalises the mean with a separate `fc_norm`, and such checkpoints are
refused by the loader, unexpected `fc_norm.*`); "token+gap", the two concatenated (2·width, what
DINOv2's linear probes read); "map", multihead attention pooling with a learned probe (SigLIP's
MAP head: attention, then x += MLP(LN(x)), as big_vision's `MAPHead` and timm's `AttentionPoolLatent`).

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

Choices (supervised `vit-*`; the other families state theirs in their modules):
* Weights only from `--checkpoint`: nothing ships offline. Formats (featdp.extraction.backbones.vit_checkpoints):
  google-research/vision_transformer and big_vision `.npz`, timm `.safetensors` or torch state dicts,
  OpenAI/OpenCLIP CLIP state dicts, the original DINOv2 `.pth`; a path or `hf-hub:ORG/NAME[@REVISION]`.
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
* Precision: matmuls and the patch embedding run in the variables' dtype (bfloat16 on accelerators),
  the residual stream, LayerNorms, layer scales and the attention softmax in float32, and the features
  come out as float32.
* Attention: `jax.nn.dot_product_attention`, with q, k and v from one fused projection (`qkv`, kernel
  (width, 3, heads, head_dim)). cuDNN's fused (flash) kernel on NVIDIA GPUs for bfloat16/float16
  inputs whose head dimension it takes (a multiple of 8, ≤ 128, ≤ 256 from Hopper on), XLA's
  otherwise (the CPU, float32, TPUs); `FEATDP_ATTENTION=xla|cudnn` overrides the choice.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from featdp.extraction.backbones.pil_preprocessing import center_crop_resize, resize_squash
from featdp.extraction.backbones.registry import Backbone, BackboneError, BackboneSpec, register_backbone

__all__ = [
    "ACTIVATIONS",
    "ALL_CONFIGS",
    "CONFIGS",
    "LN_EPSILON",
    "MEAN_RGB",
    "POOLS",
    "POS_RESIZE",
    "STD_RGB",
    "ViT",
    "ViTConfig",
    "attention",
    "attention_implementation",
    "checkpoint_sources",
    "get_config",
    "make_apply",
    "make_backbone",
    "make_prepare",
    "random_backbone",
    "register_vit",
]

LN_EPSILON = 1e-6  # flax LayerNorm's default, which the Google checkpoints were trained with
MEAN_RGB = (0.5, 0.5, 0.5)
STD_RGB = (0.5, 0.5, 0.5)
CROP_FRACTION = 0.9
POOLS = ("token", "gap", "token+gap", "map")
ACTIVATIONS = ("gelu", "quick_gelu", "swiglu")
# How a stored position-embedding grid is resampled to another resolution:
#   bilinear: torch bilinear, align_corners=False, no antialias (timm on the Google .npz files);
#   bicubic: torch bicubic (a = −0.75), align_corners=False, no antialias, to the output size;
#   bicubic_dinov2: the same with DINOv2's scale factor (g_out + 0.1)/g_in, what its models compute.
POS_RESIZE = ("bilinear", "bicubic", "bicubic_dinov2")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of one ViT, its pooling and its input pipeline; `image_size` is the default resolution.

    The defaults are the supervised ViT of vision_transformer/big_vision/timm; the other families set
    the switches below.
    """

    name: str
    width: int
    depth: int
    num_heads: int
    mlp_dim: int  # hidden width of the MLP (for SwiGLU: of each of its two branches)
    patch_size: int
    image_size: int = 224
    class_token: bool = True
    pool: str = "token"
    gelu_approximate: bool = False
    activation: str = "gelu"
    ln_epsilon: float = LN_EPSILON
    patch_bias: bool = True
    pre_norm: bool = False  # LayerNorm after the position embedding (CLIP's ln_pre)
    layer_scale: bool = False  # per-channel scales on both residual branches (DINOv2)
    num_registers: int = 0  # tokens after the class token, no position embedding (DINOv2 "reg")
    projection_dim: int = 0  # > 0: the feature is Dense(projection_dim) of the pooled one (CLIP's proj)
    # Input pipeline (uint8 -> crop/resize on the loader; -> normalised floats on the device).
    mean: tuple[float, float, float] = MEAN_RGB
    std: tuple[float, float, float] = STD_RGB
    crop_fraction: float = CROP_FRACTION  # central square of this × the shorter side; 0: squash, no crop
    pos_resize: str = "bilinear"
    resolution_from_checkpoint: bool = True  # default resolution: the checkpoint's grid, else image_size

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.pool in ("token", "token+gap") and not self.class_token:
            raise ValueError(f"pool={self.pool!r} needs class_token=True")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.pos_resize not in POS_RESIZE:
            raise ValueError(f"pos_resize must be one of {POS_RESIZE}, got {self.pos_resize!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in [0, 1], got {self.crop_fraction}")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """Rows of the position embedding: the patches, plus the class token if any."""
        return self.grid_size**2 + int(self.class_token)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.num_registers

    @property
    def feature_dim(self) -> int:
        if self.projection_dim:
            return self.projection_dim
        return 2 * self.width if self.pool == "token+gap" else self.width


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
# Every registered ViT-family backbone (this module's and those of clip, siglip, dinov2), by name.
ALL_CONFIGS: dict[str, ViTConfig] = {}
_LONG_SOURCES: dict[str, str] = {}


def get_config(name: str) -> ViTConfig:
    try:
        return ALL_CONFIGS.get(name) or CONFIGS[name]
    except KeyError:
        raise BackboneError(f"unknown ViT {name!r}; choose one of {sorted(set(CONFIGS) | set(ALL_CONFIGS))}") from None


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


_SHORT_SOURCE = "none ship; --checkpoint: vision_transformer/big_vision .npz, timm .safetensors, or hf-hub:ORG/NAME"


def checkpoint_sources(name: str) -> str:
    """Where to get weights for backbone `name`, for `featdp backbones` and the load(None) error."""
    if name in _LONG_SOURCES:
        return _LONG_SOURCES[name]
    if name not in _SOURCES:
        return ("no public checkpoint of this shape; pass --checkpoint PATH to a big_vision/"
                "vision_transformer .npz or a timm .safetensors of this shape")
    npz, timm = _SOURCES[name]
    return ("no weights ship; pass --checkpoint PATH to a vision_transformer .npz (e.g. "
            + " or ".join(npz) + ") or a timm model.safetensors (hub repositories "
            + ", ".join(timm) + "), or --checkpoint hf-hub:" + timm[0])


# ----------------------------------------------------------------------------------------------------
# Attention

_FALLBACK_WARNED: set[str] = set()


def attention_implementation(dtype, head_dim: int) -> str:
    """"cudnn" (fused flash attention) where cuDNN takes these inputs, else "xla".

    cuDNN's kernel needs an NVIDIA GPU (Ampere or later), bfloat16 or float16 inputs and a head
    dimension that is a multiple of 8 and at most 128 (256 from Hopper on); float32 and every other
    backend use XLA's. `FEATDP_ATTENTION=xla|cudnn` forces one.
    """
    forced = os.environ.get("FEATDP_ATTENTION", "").strip().lower()
    if forced in ("xla", "cudnn"):
        return forced
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "xla"
    try:
        if jax.default_backend() != "gpu":
            return "xla"
        device = jax.local_devices()[0]
        client = getattr(device, "client", None)
        version = str(getattr(client, "platform_version", "")).lower()
        if "rocm" in version or "hip" in version or not ("nvidia" in device.device_kind.lower() or "cuda" in version):
            return "xla"
        capability = tuple(int(part) for part in str(device.compute_capability).split("."))
    except Exception:  # noqa: BLE001 (no GPU client, or a plugin without these attributes)
        return "xla"
    if capability < (8, 0) or head_dim % 8 or head_dim > (256 if capability >= (9, 0) else 128):
        return "xla"
    return "cudnn"


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention over (N, T, H, d) inputs, (N, S, H, d) keys and values -> (N, T, H, d).

    Logits and softmax in float32 either way (XLA: `preferred_element_type=float32`, the probabilities
    cast back to the inputs' dtype for the value product; cuDNN: float32 accumulators)."""
    implementation = attention_implementation(q.dtype, q.shape[-1])
    if implementation == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        except (NotImplementedError, RuntimeError, ValueError) as error:  # checked while tracing
            key = f"{q.shape}{q.dtype}"
            if key not in _FALLBACK_WARNED:
                _FALLBACK_WARNED.add(key)
                warnings.warn(f"cuDNN attention unavailable for {q.shape} {q.dtype} ({error}); using XLA's",
                              RuntimeWarning, stacklevel=2)
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


# ----------------------------------------------------------------------------------------------------
# Modules

def _layer_norm(name: str, epsilon: float) -> nn.LayerNorm:
    # dtype float32: statistics and output in float32 whatever the parameters' dtype.
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, name=name)


def _activate(x: jax.Array, config: ViTConfig) -> jax.Array:
    if config.activation == "quick_gelu":  # OpenAI CLIP's x·σ(1.702x)
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=config.gelu_approximate)


class _Mlp(nn.Module):
    """fc1 → activation → fc2 on compute-dtype inputs; SwiGLU packs both branches in fc1 ([a; b])."""

    config: ViTConfig
    dtype: Any

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        c = self.config
        if c.activation == "swiglu":
            a, b = jnp.split(nn.Dense(2 * c.mlp_dim, dtype=self.dtype, name="fc1")(y), 2, axis=-1)
            y = nn.silu(a) * b
        else:
            y = _activate(nn.Dense(c.mlp_dim, dtype=self.dtype, name="fc1")(y), c)
        return nn.Dense(c.width, dtype=self.dtype, name="fc2")(y)


class _Attention(nn.Module):
    num_heads: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        qkv = nn.DenseGeneral((3, self.num_heads, width // self.num_heads), dtype=self.dtype, name="qkv")(x)
        y = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # each (N, T, H, head_dim)
        return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out")(y)


class _Block(nn.Module):
    config: ViTConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        y = _layer_norm("norm1", c.ln_epsilon)(x).astype(self.dtype)
        y = _Attention(c.num_heads, self.dtype, name="attn")(y).astype(x.dtype)
        if c.layer_scale:
            y = y * self.param("ls1", nn.initializers.ones, (c.width,)).astype(x.dtype)
        x = x + y
        y = _layer_norm("norm2", c.ln_epsilon)(x).astype(self.dtype)
        y = _Mlp(c, self.dtype, name="mlp")(y).astype(x.dtype)
        if c.layer_scale:
            y = y * self.param("ls2", nn.initializers.ones, (c.width,)).astype(x.dtype)
        return x + y


class _MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens, then x += MLP(LN(x))."""

    config: ViTConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        n = x.shape[0]
        probe = self.param("probe", nn.initializers.normal(0.02), (1, 1, c.width))
        heads = (c.num_heads, c.head_dim)
        q = nn.DenseGeneral(heads, dtype=self.dtype, name="query")(
            jnp.broadcast_to(probe, (n, 1, c.width)).astype(self.dtype))
        kv = nn.DenseGeneral((2, *heads), dtype=self.dtype, name="kv")(x.astype(self.dtype))
        y = attention(q, kv[:, :, 0], kv[:, :, 1])
        y = nn.DenseGeneral(c.width, axis=(-2, -1), dtype=self.dtype, name="out")(y).astype(jnp.float32)
        z = _layer_norm("norm", c.ln_epsilon)(y).astype(self.dtype)
        y = y + _Mlp(c, self.dtype, name="mlp")(z).astype(jnp.float32)
        return y[:, 0]


class _PatchEmbed(nn.Module):
    """p×p patches, row-major over the grid, times a (p, p, 3, width) kernel: a stride-p convolution
    written as one matmul (an HWIO conv kernel, as the checkpoints store it)."""

    width: int
    patch_size: int
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p, width = self.patch_size, self.width
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, 3, width))
        n, h, w, c = images.shape
        patches = images.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, (h // p) * (w // p), p * p * c).astype(self.dtype)
        x = jnp.dot(patches, kernel.reshape(p * p * c, width).astype(self.dtype))
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (width,)).astype(self.dtype)
        return x


class ViT(nn.Module):
    """Normalised images (N, R, R, 3) -> pooled float32 features (N, feature_dim).

    `dtype` is the compute dtype of the matmuls (normally that of the variables); the residual stream,
    LayerNorms and softmax stay in float32. Variables: {"params": {patch_embed, [cls_token], [reg_token],
    pos_embed, [norm_pre], block{i}: {norm1, attn: {qkv, out}, [ls1], norm2, mlp: {fc1, fc2}, [ls2]},
    norm, [map_head: {probe, query, kv, out, norm, mlp}], [head]}}.
    """

    config: ViTConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        c = self.config
        if images.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"{c.name} expects (N, {c.image_size}, {c.image_size}, 3) images, "
                             f"got {images.shape}")
        x = _PatchEmbed(c.width, c.patch_size, c.patch_bias, self.dtype, name="patch_embed")(images)
        x = x.astype(jnp.float32)
        n = x.shape[0]
        if c.class_token:
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.width))
            x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (n, 1, c.width)), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, c.num_tokens, c.width))
        x = x + pos.astype(x.dtype)
        if c.num_registers:
            reg = self.param("reg_token", nn.initializers.zeros, (1, c.num_registers, c.width))
            reg = jnp.broadcast_to(reg.astype(x.dtype), (n, c.num_registers, c.width))
            cut = int(c.class_token)
            x = jnp.concatenate([x[:, :cut], reg, x[:, cut:]], axis=1)
        if c.pre_norm:
            x = _layer_norm("norm_pre", c.ln_epsilon)(x)
        for i in range(c.depth):
            x = _Block(c, self.dtype, name=f"block{i}")(x)
        x = _layer_norm("norm", c.ln_epsilon)(x)
        if c.pool == "map":
            features = _MAPHead(c, self.dtype, name="map_head")(x)
        elif c.pool == "token":
            features = x[:, 0]
        elif c.pool == "gap":
            features = jnp.mean(x[:, c.num_prefix_tokens:], axis=1)
        else:  # token+gap
            features = jnp.concatenate([x[:, 0], jnp.mean(x[:, c.num_prefix_tokens:], axis=1)], axis=-1)
        if c.projection_dim:
            features = nn.Dense(c.projection_dim, dtype=self.dtype, name="head")(features.astype(self.dtype))
        return features.astype(jnp.float32)


def make_apply(config: ViTConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """The registry's `apply`: uint8 (N, R, R, 3) -> float32 (N, feature_dim), in the variables' dtype."""
    mean = jnp.asarray(config.mean, jnp.float32)
    std = jnp.asarray(config.std, jnp.float32)

    def apply(variables: Any, images: jax.Array) -> jax.Array:
        dtype = variables["params"]["patch_embed"]["kernel"].dtype
        x = (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std
        return ViT(config, dtype=dtype).apply(variables, x)

    return apply


def make_prepare(config: ViTConfig) -> Callable[[np.ndarray], np.ndarray]:
    """The loader's per-image step for `config`: center crop + bicubic resize, or a squash resize."""
    if config.crop_fraction == 0:
        return functools.partial(resize_squash, size=config.image_size)
    return functools.partial(center_crop_resize, size=config.image_size, crop_fraction=config.crop_fraction)


def _preprocessing(config: ViTConfig, info: Any, extra: dict | None = None) -> dict:
    size = config.image_size
    crop = (f"none: the whole image resized to {size}x{size} (aspect ratio not kept)" if config.crop_fraction == 0
            else f"central {config.crop_fraction:g} of the shorter side")
    pos_grid = info.checkpoint_image_size // config.patch_size
    return {
        "crop": crop,
        "resize": f"{size}x{size} bicubic (Pillow)",
        "normalize": {"mean": list(config.mean), "std": list(config.std), "scale": "pixels/255"},
        "pool": config.pool,
        "feature_dim": config.feature_dim,
        "projection": f"linear to {config.projection_dim}" if config.projection_dim else "none",
        "gelu": "tanh approximation" if config.gelu_approximate else "exact (erf)",
        "activation": config.activation,
        "layer_norm_epsilon": config.ln_epsilon,
        "pre_norm": config.pre_norm,
        "layer_scale": config.layer_scale,
        "registers": config.num_registers,
        "checkpoint_format": info.format,
        "checkpoint_image_size": info.checkpoint_image_size,
        "pos_embed": (f"resampled ({config.pos_resize}) from {pos_grid}^2 to {config.grid_size}^2"
                      if pos_grid != config.grid_size else "as stored"),
        "ignored_checkpoint_tensors": list(info.ignored),
        **(extra or {}),
    }


ActivationChoice = Callable[[Any], tuple[str, str]]  # CheckpointFile -> (activation, why)


def make_backbone(config: ViTConfig | str, checkpoint: str | None, image_size: int | None = None,
                  pool: str | None = None, gelu_approximate: bool | None = None,
                  activation: str | ActivationChoice | None = None) -> Backbone:
    """A `Backbone` from a checkpoint (a file, or `hf-hub:ORG/NAME[@REVISION][:FILE]`); the
    architecture is `config`, checked against the file.

    `image_size` None: the checkpoint's own resolution (`config.image_size` when the config does not
    follow the checkpoint). `pool` None: the config's ("token" falls back to "gap" for a checkpoint
    without a class token). `activation`: a name, or a function of the resolved checkpoint file that
    returns (name, reason) (CLIP decides QuickGELU from the files beside the weights).
    """
    from featdp.extraction.backbones import vit_checkpoints

    config = get_config(config) if isinstance(config, str) else config
    file = vit_checkpoints.resolve_checkpoint_file(checkpoint, config)
    extra = {}
    if callable(activation):
        name, why = activation(file)
        config = dataclasses.replace(config, activation=name)
        extra["activation_source"] = why
    elif activation is not None:
        config = dataclasses.replace(config, activation=activation)
    loaded = vit_checkpoints.load_vit_checkpoint(
        file, config, image_size=image_size, pool=pool, gelu_approximate=gelu_approximate)
    cfg = loaded.config
    if file.hub is not None:
        extra["hf_hub"] = file.hub
    return Backbone(
        name=config.name,
        feature_dim=cfg.feature_dim,
        image_size=cfg.image_size,
        variables=loaded.variables,
        apply=make_apply(cfg),
        prepare=make_prepare(cfg),
        checkpoint=loaded.path,
        checkpoint_sha256=loaded.sha256,
        preprocessing=_preprocessing(cfg, loaded, extra),
    )


def random_variables(config: ViTConfig, seed: int = 0) -> dict:
    """Random float32 numpy variables of `config`: N(0, 0.02²) everywhere, 1 + N(0, 0.02²) for the
    LayerNorm and layer scales (no leaf exactly 0 or 1, as in a trained checkpoint). Drawn with numpy
    from the model's shapes: initialising a ViT-L op by op takes tens of seconds."""
    size = config.image_size
    shapes = jax.eval_shape(lambda x: ViT(config).init(jax.random.key(0), x),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        x = 0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)
        return x + 1 if name.endswith(("['scale']", "['ls1']", "['ls2']")) else x

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_backbone(name: str | ViTConfig, depth: int | None = None, seed: int = 0) -> Backbone:
    """Backbone `name` with random weights (throughput checks; no checkpoint needed)."""
    config = get_config(name) if isinstance(name, str) else name
    if depth is not None:
        config = dataclasses.replace(config, depth=depth)
    return Backbone(config.name, config.feature_dim, config.image_size, random_variables(config, seed),
                    make_apply(config), make_prepare(config), "random", "", {"weights": "random (throughput only)"})


def register_vit(config: ViTConfig, short_source: str, long_source: str | None = None,
                 load: Callable[[str | None], Backbone] | None = None) -> None:
    """Registers a ViT-family backbone: `featdp backbones` shows `short_source`; loading without a
    checkpoint fails with `long_source`."""
    ALL_CONFIGS[config.name] = config
    if long_source is not None:
        _LONG_SOURCES[config.name] = long_source
    register_backbone(BackboneSpec(
        name=config.name, feature_dim=config.feature_dim, image_size=config.image_size,
        checkpoint_source=short_source, load=load or functools.partial(make_backbone, config.name)))


def _register() -> None:
    for name, config in CONFIGS.items():
        register_vit(config, _SHORT_SOURCE + (f", e.g. {_SOURCES[name][1][0]}" if name in _SOURCES else ""))


_register()
