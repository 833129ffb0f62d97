"""ScatterNet: the weight-free feature extractor of Tramèr & Boneh (2021), "Differentially Private
Learning Needs Better Features (or Much More Data)".

    uint8 (N, R, R, 3) --[gray variant: BT.601 luma]--> pixels/255 --[(x − mean)/std, RGB variant]-->
    2-D scattering, J = 2, L = 8, order ≤ 2 (kymatio) --> GroupNorm per example, 27 groups, no affine
    --> flatten (C, H, W) order

Scattering with J = 2 and L = 8 gives K = 1 + J·L + L²·J(J−1)/2 = 1 + 16 + 64 = 81 channels per input
channel at R/4 × R/4:

| backbone           | input          | channels  | features                      |
|--------------------|----------------|-----------|-------------------------------|
| `scatternet`       | 28×28 gray     | 81        | 81 · 7 · 7 = 3969             |
| `scatternet-rgb32` | 32×32 RGB      | 3 · 81    | 243 · 8 · 8 = 15552           |

Choices, each as in the paper's code (ftramer/Handcrafted-DP) unless stated:
* The transform is kymatio's own JAX frontend (`kymatio.jax.Scattering2D`), traced into the jitted
  `apply`; its Fourier-domain filter bank (float32 numpy) becomes compile-time constants. `variables` is
  therefore empty, so casting floating variables to bfloat16 (what `featdp extract` does on GPU) cannot
  touch the filters, and `apply` casts the pixels to float32: the features are float32 whatever the
  compute dtype.
* Channels: `prepare` returns (R, R, 3) uint8 like every backbone (gray sources are replicated). The gray
  variant turns it back into one channel inside `apply` with BT.601 luma (0.299, 0.587, 0.114), which
  gives back a replicated gray image exactly up to float rounding. The RGB variant scatters each colour
  separately; channel c·81 + k is path k of colour c (kymatio's output (N, 3, 81, h, w) reshaped, which
  is how the paper's code views it).
* Pixel scaling: pixels/255 for the gray variant (torchvision `ToTensor`, as in the paper's MNIST and
  Fashion-MNIST runs); the RGB variant also subtracts the ImageNet mean and divides by its std per
  colour, as the paper's CIFAR-10 loader does. The zero-mean wavelets ignore the mean shift and
  GroupNorm undoes the per-colour scale up to eps (groups never mix colours), so in effect this
  changes only the groups that hold an order-0 (low-pass) channel.
* Normalisation: GroupNorm without learned affine parameters over 27 groups of consecutive channels
  (3 per group for gray, 9 for RGB), biased variance, eps 1e-5 (torch `nn.GroupNorm(27, K,
  affine=False)`). It uses one example's own coefficients only, so it is privacy-free (a per-example map).
  Departure: the paper used GroupNorm(27) for Fashion-MNIST only, and for MNIST and CIFAR-10 a
  BatchNorm whose statistics are released with DP noise; that is a separate, accounted release and is
  not part of a backbone.

kymatio is imported only when a ScatterNet backbone is loaded, so registering it costs nothing when
kymatio is absent. kymatio 0.3.0 imports `scipy.special.sph_harm` (removed in SciPy 1.17) when its
package is imported, whichever frontend is used; it needs SciPy < 1.17.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from featdp.extraction.backbones.pil_preprocessing import center_crop_resize
from featdp.extraction.backbones.registry import Backbone, BackboneError, BackboneSpec, register_backbone

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "VARIANTS",
    "ScatterNetConfig",
    "get_config",
    "group_norm",
    "make_apply",
    "make_scattering",
    "make_transform",
    "to_input",
]

MAX_ORDER = 2
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L") and torchvision Grayscale
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FREE = "none (weight-free)"


@dataclasses.dataclass(frozen=True)
class ScatterNetConfig:
    """Public constants of one ScatterNet variant. `mean`/`std` are per input channel, on [0, 1] pixels."""

    image_size: int
    grayscale: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    J: int = 2
    L: int = 8
    num_groups: int = 27
    eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % 2**self.J:
            raise ValueError(f"image size must be a multiple of 2**J = {2**self.J}, got {self.image_size}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"mean and std need {self.in_channels} entries, got {self.mean} and {self.std}")
        if self.channels % self.num_groups:
            raise ValueError(f"{self.channels} scattering channels do not split into {self.num_groups} groups")

    @property
    def in_channels(self) -> int:
        return 1 if self.grayscale else 3

    @property
    def paths(self) -> int:
        """Scattering paths per input channel: 1 low-pass, J·L first order, L²·J(J−1)/2 second order."""
        return 1 + self.J * self.L + self.L**2 * self.J * (self.J - 1) // 2

    @property
    def channels(self) -> int:
        return self.in_channels * self.paths

    @property
    def spatial(self) -> int:
        return self.image_size // 2**self.J

    @property
    def feature_dim(self) -> int:
        return self.channels * self.spatial**2


VARIANTS = {
    "scatternet": ScatterNetConfig(image_size=28, grayscale=True, mean=(0.0,), std=(1.0,)),
    "scatternet-rgb32": ScatterNetConfig(image_size=32, grayscale=False, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}


def get_config(name: str) -> ScatterNetConfig:
    if name not in VARIANTS:
        raise BackboneError(f"unknown ScatterNet variant {name!r}; available: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def to_input(config: ScatterNetConfig, images: jax.Array) -> jax.Array:
    """uint8 (N, R, R, 3) -> float32 (N, C_in, R, R): gray (luma) or RGB, pixels/255, (x − mean)/std."""
    if images.ndim != 4 or images.shape[1:] != (config.image_size, config.image_size, 3):
        size = config.image_size
        raise ValueError(f"expected a (N, {size}, {size}, 3) batch, got shape {images.shape}")
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    if config.grayscale:
        x = x @ jnp.asarray(LUMA_WEIGHTS, jnp.float32)[:, None]
    x = (x - jnp.asarray(config.mean, jnp.float32)) / jnp.asarray(config.std, jnp.float32)
    return jnp.transpose(x, (0, 3, 1, 2))


def make_scattering(config: ScatterNetConfig) -> Callable[[jax.Array], jax.Array]:
    """float32 (N, C_in, R, R) -> (N, C_in·81, R/4, R/4), kymatio's JAX frontend; jittable."""
    try:
        from kymatio.jax import Scattering2D
    except ImportError as err:  # absent, or SciPy ≥ 1.17 (see the module docstring)
        raise BackboneError(f"ScatterNet needs kymatio (pip install kymatio==0.3.0, scipy<1.17): {err}") from err
    size = config.image_size
    scattering = Scattering2D(J=config.J, shape=(size, size), L=config.L, max_order=MAX_ORDER)

    def scatter(x: jax.Array) -> jax.Array:
        s = scattering(jnp.asarray(x, jnp.float32))  # (N, C_in, paths, h, w)
        return s.reshape(s.shape[0], config.channels, config.spatial, config.spatial)

    return scatter


def group_norm(x: jax.Array, num_groups: int, eps: float) -> jax.Array:
    """(N, C, H, W) -> same: each example's channels in `num_groups` consecutive groups, each group
    centred and divided by sqrt(its biased variance + eps); no affine parameters."""
    n, c, h, w = x.shape
    groups = x.reshape(n, num_groups, (c // num_groups) * h * w)
    mean = jnp.mean(groups, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(groups - mean), axis=-1, keepdims=True)
    return ((groups - mean) * jax.lax.rsqrt(var + eps)).reshape(n, c, h, w)


def make_transform(config: ScatterNetConfig) -> Callable[[jax.Array], jax.Array]:
    """uint8 (N, R, R, 3) -> float32 scattering coefficients (N, C, R/4, R/4), before GroupNorm."""
    scatter = make_scattering(config)
    return lambda images: scatter(to_input(config, images))


def make_apply(config: ScatterNetConfig) -> Callable[[Any, jax.Array], jax.Array]:
    """The backbone's `apply(variables, uint8 (N, R, R, 3)) -> float32 (N, D)`; `variables` is unused."""
    transform = make_transform(config)

    def apply(variables: Any, images: jax.Array) -> jax.Array:
        del variables  # weight-free: the filter bank is a constant of the compiled program
        s = group_norm(transform(images), config.num_groups, config.eps)
        return s.reshape(s.shape[0], config.feature_dim)

    return apply


def _preprocessing(config: ScatterNetConfig) -> dict:
    import kymatio

    size = config.image_size
    return {
        "crop": "none (whole image; a non-square one: its central square)",
        "resize": f"{size}x{size} bicubic (Pillow), only when the size differs",
        "channels": "gray: BT.601 luma of the RGB-replicated input" if config.grayscale
        else "RGB, each colour scattered separately (channel = colour*81 + path)",
        "normalize": {"mean": list(config.mean), "std": list(config.std), "scale": "pixels/255"},
        "scattering": {"J": config.J, "L": config.L, "max_order": MAX_ORDER,
                       "implementation": f"kymatio {kymatio.__version__} jax frontend", "dtype": "float32"},
        "group_norm": {"groups": config.num_groups, "eps": config.eps, "affine": False, "per_example": True},
    }


def _load_registered(name: str) -> Callable[[str | None], Backbone]:
    def load(checkpoint: str | None) -> Backbone:
        if checkpoint is not None:
            raise BackboneError(f"{name} is weight-free and takes no checkpoint, got {checkpoint!r}")
        config = get_config(name)
        return Backbone(
            name=name,
            feature_dim=config.feature_dim,
            image_size=config.image_size,
            variables={},
            apply=make_apply(config),
            prepare=functools.partial(center_crop_resize, size=config.image_size, crop_fraction=1.0),
            checkpoint=WEIGHT_FREE,
            checkpoint_sha256="",
            preprocessing=_preprocessing(config),
        )

    return load


def _register() -> None:
    for name, config in VARIANTS.items():
        register_backbone(BackboneSpec(
            name=name, feature_dim=config.feature_dim, image_size=config.image_size,
            checkpoint_source=WEIGHT_FREE, load=_load_registered(name),
        ))


_register()
