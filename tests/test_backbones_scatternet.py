"""ScatterNet backbones: the JAX scattering against kymatio's NumPy frontend (the oracle), the
per-example GroupNorm against a float64 NumPy GroupNorm, and the registry contract."""

from __future__ import annotations

import jax
import numpy as np
import pytest

pytest.importorskip("kymatio")
from kymatio.numpy import Scattering2D as NumpyScattering2D  # noqa: E402

from featdp.extraction.backbones import scatternet  # noqa: E402
from featdp.extraction.backbones.registry import BackboneError, backbone_specs, load_backbone  # noqa: E402

VARIANTS = ["scatternet", "scatternet-rgb32"]
PARITY_RTOL = 1e-4


N = 4  # one batch size everywhere: one compiled program per variant (plus a batch of one)


@pytest.fixture(scope="module", params=VARIANTS)
def loaded(request):
    backbone = load_backbone(request.param)
    return backbone, scatternet.get_config(request.param), jax.jit(backbone.apply)


@pytest.fixture(scope="module")
def transform(loaded):
    return jax.jit(scatternet.make_transform(loaded[1]))


def _images(config, n, seed=0, gray=False):
    """Random uint8 (n, R, R, 3) batches; smooth ones too, so the low-pass and first-order groups
    carry real structure rather than white noise."""
    rng = np.random.default_rng(seed)
    r = config.image_size
    noise = rng.integers(0, 256, size=(n, r, r, 1 if gray else 3))
    yy, xx = np.mgrid[0:r, 0:r] / r
    freq = rng.uniform(1, 6, size=(n, 1, 1, noise.shape[-1]))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1, noise.shape[-1]))
    smooth = 127.5 * (1 + np.sin(2 * np.pi * freq * (xx + 0.5 * yy)[None, ..., None] + phase))
    mix = rng.uniform(0, 1, size=(n, 1, 1, 1))
    images = np.clip(mix * noise + (1 - mix) * smooth, 0, 255).astype(np.uint8)
    return np.repeat(images, 3, axis=-1) if gray else images


def _oracle_scattering(config, images):
    """kymatio's NumPy frontend (float64 input) on the same preprocessing, written out in NumPy."""
    x = images.astype(np.float64) / 255.0
    if config.grayscale:
        x = x @ np.asarray(scatternet.LUMA_WEIGHTS)[:, None]
    x = (x - np.asarray(config.mean)) / np.asarray(config.std)
    x = np.transpose(x, (0, 3, 1, 2))
    s = NumpyScattering2D(J=2, shape=x.shape[-2:], L=8)(x)  # (N, C_in, 81, h, w)
    return s.reshape(len(x), -1, *s.shape[-2:])


def _oracle_group_norm(s, groups, eps):
    g = s.reshape(len(s), groups, -1).astype(np.float64)
    g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + eps)
    return g.reshape(len(s), -1)


def _rel_err(a, b):
    """Largest error per channel, relative to that channel's largest coefficient (so the small
    second-order channels are held to the same relative standard as the low-pass one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    axes = tuple(range(2, a.ndim))
    return float(np.max(np.max(np.abs(a - b), axis=axes) / np.max(np.abs(b), axis=axes)))


def test_registered_with_documented_dims():
    specs = backbone_specs()
    assert specs["scatternet"].feature_dim == 81 * 7 * 7 == 3969
    assert specs["scatternet"].image_size == 28
    assert specs["scatternet-rgb32"].feature_dim == 3 * 81 * 8 * 8 == 15552
    assert specs["scatternet-rgb32"].image_size == 32
    for name in VARIANTS:
        assert specs[name].checkpoint_source == "none (weight-free)"


@pytest.mark.parametrize("name", VARIANTS)
def test_load_refuses_a_checkpoint(name, tmp_path):
    with pytest.raises(BackboneError, match="weight-free"):
        load_backbone(name, str(tmp_path / "weights.pth"))


def test_unknown_variant():
    with pytest.raises(BackboneError, match="scatternet-rgb32"):
        scatternet.get_config("scatternet-rgb64")


def test_prepare_returns_rgb_uint8_at_the_configured_size(loaded):
    backbone, config, _ = loaded
    r = config.image_size
    gray = np.random.default_rng(1).integers(0, 256, size=(r, r), dtype=np.uint8)
    prepared = backbone.prepare(gray)
    assert prepared.shape == (r, r, 3) and prepared.dtype == np.uint8
    np.testing.assert_array_equal(prepared, np.repeat(gray[..., None], 3, axis=-1))  # same size: untouched
    big = np.random.default_rng(2).integers(0, 256, size=(2 * r + 5, 3 * r, 4), dtype=np.uint8)
    assert backbone.prepare(big).shape == (r, r, 3)


def test_apply_shape_finite_and_float32(loaded):
    backbone, config, apply = loaded
    features = apply(backbone.variables, _images(config, N))
    assert features.shape == (N, config.feature_dim) == (N, backbone.feature_dim)
    assert features.dtype == np.float32
    assert np.all(np.isfinite(np.asarray(features)))
    assert np.all(np.isfinite(np.asarray(apply(backbone.variables, np.zeros_like(_images(config, N))))))


def test_wrong_image_size_is_refused(loaded):
    backbone, config, _ = loaded
    r = config.image_size + 4
    with pytest.raises(ValueError, match=f"{config.image_size}, {config.image_size}, 3"):
        backbone.apply({}, np.zeros((1, r, r, 3), np.uint8))


@pytest.mark.parametrize("gray_source", [False, True])
def test_scattering_matches_kymatio_numpy(loaded, transform, gray_source):
    """The JAX transform before GroupNorm against kymatio's NumPy frontend; for the gray variant both
    on colour images (luma) and on gray images replicated to RGB (luma gives the gray image back)."""
    _, config, _ = loaded
    images = _images(config, N, seed=4, gray=gray_source)
    jax_s = np.asarray(transform(images))
    oracle = _oracle_scattering(config, images)
    assert jax_s.shape == oracle.shape == (N, config.channels, config.spatial, config.spatial)
    assert _rel_err(jax_s, oracle) <= PARITY_RTOL
    if gray_source and config.grayscale:
        direct = NumpyScattering2D(J=2, shape=images.shape[1:3], L=8)(images[..., 0] / 255.0)
        assert _rel_err(jax_s, direct) <= PARITY_RTOL


def test_features_match_numpy_pipeline(loaded):
    """Channel order (colour-major), group layout and eps, against kymatio NumPy + float64 GroupNorm."""
    backbone, config, apply = loaded
    images = _images(config, N, seed=5)
    expected = _oracle_group_norm(_oracle_scattering(config, images), config.num_groups, config.eps)
    np.testing.assert_allclose(apply(backbone.variables, images), expected, rtol=0, atol=2e-4)


def test_group_norm_standardizes_every_group(loaded, transform):
    backbone, config, apply = loaded
    images = _images(config, N, seed=6)
    raw_var = np.asarray(transform(images), np.float64).reshape(N, config.num_groups, -1).var(-1)
    groups = np.asarray(apply(backbone.variables, images), np.float64).reshape(N, config.num_groups, -1)
    np.testing.assert_allclose(groups.mean(-1), 0.0, atol=1e-5)
    # Biased variance raw / (raw + eps): 1 wherever a group's own variance dwarfs eps.
    np.testing.assert_allclose(groups.var(-1), raw_var / (raw_var + config.eps), rtol=1e-3)
    np.testing.assert_allclose(groups.var(-1)[raw_var > 1e-3], 1.0, atol=1e-2)


def test_group_norm_unit_gaussian():
    x = np.random.default_rng(7).normal(3.0, 5.0, size=(2, 81, 7, 7)).astype(np.float32)
    g = np.asarray(scatternet.group_norm(x, 27, 1e-5)).reshape(2, 27, -1)
    np.testing.assert_allclose(g.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(g.var(-1), 1.0, rtol=1e-5)


def test_features_of_an_example_do_not_depend_on_the_batch(loaded):
    backbone, config, apply = loaded
    images = _images(config, N, seed=8)
    batch = np.asarray(apply(backbone.variables, images))
    alone = np.asarray(apply(backbone.variables, images[2:3]))
    np.testing.assert_allclose(alone[0], batch[2], rtol=0, atol=1e-5)
    others = _images(config, N, seed=9)
    others[2] = images[2]
    np.testing.assert_allclose(np.asarray(apply(backbone.variables, others))[2], batch[2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(apply(backbone.variables, images[::-1])), batch[::-1], rtol=0, atol=1e-5)


def test_bfloat16_compute_dtype_keeps_float32_scattering(loaded):
    """`featdp extract` casts floating variables to bfloat16 on GPU: nothing here is a variable, so the
    features are exactly the float32 ones."""
    backbone, config, apply = loaded
    variables = jax.tree_util.tree_map(lambda v: v.astype(jax.numpy.bfloat16), backbone.variables)
    images = _images(config, N, seed=10)
    out = apply(variables, images)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, apply(backbone.variables, images))
