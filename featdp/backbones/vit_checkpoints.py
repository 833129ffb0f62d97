"""ViT checkpoints -> `featdp.backbones.vit.ViT` variables, without torch or TensorFlow.

Layouts read (by key names, whatever the file's extension):

* timm (`.safetensors` through the safetensors package's numpy API; `.pth`/`.bin` through the torch-free
  reader of featdp.backbones.torch_checkpoint): `patch_embed.proj.weight` (D, 3, p, p), `cls_token`,
  `pos_embed` (1, 1 + g², D), `blocks.N.{norm1,norm2}.{weight,bias}`, `blocks.N.attn.qkv.weight`
  (3D, D) with q, k, v stacked in that order, `blocks.N.attn.proj`, `blocks.N.mlp.{fc1,fc2}`,
  `norm.{weight,bias}`. torch Linear weights are (out, in): transposed here.
* google-research/vision_transformer `.npz` (optionally under `opt/target/`): `embedding/kernel`
  (p, p, 3, D), `cls`, `Transformer/posembed_input/pos_embedding` (1, 1 + g², D),
  `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
  `Transformer/encoder_norm`; attention kernels are already per head: query/key/value (D, H, d),
  out (H, d, D).
* big_vision `.npz` (under `params/` or, for a two-tower model, `params/img/`): the same, except the
  block's children are `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, the
  position embedding is `pos_embedding` (1, g², D) and covers the patches only (the class token is
  concatenated after it is added: here its row of `pos_embed` is zero), and a scanned encoder stores
  each block tensor once as `Transformer/encoderblock/...` with a leading depth axis.

Every checkpoint tensor is used exactly once; only the classifier (`head`, and `pre_logits`, the
tanh "representation" layer of the original ImageNet-21k checkpoints, which timm drops too: features
are taken before it) and, in a `params/img/` checkpoint, the other towers are skipped; they are listed
in `LoadedViT.ignored`.
Anything else missing, unexpected or of the wrong shape is reported all at once in a
`ViTCheckpointError`. A position-embedding grid that differs from the requested resolution is
resampled bilinearly (half-pixel centres, no antialiasing: torch's `interpolate(mode="bilinear",
align_corners=False)`, what timm uses for these `.npz` files).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from featdp.checksums import file_sha256

from featdp.backbones.registry import BackboneError
from featdp.backbones.vit import CONFIGS, POOLS, ViTConfig, checkpoint_sources

__all__ = [
    "LoadedViT",
    "ViTCheckpointError",
    "convert_checkpoint",
    "expected_checkpoint_shapes",
    "linear_resize_matrix",
    "load_vit_checkpoint",
    "read_checkpoint",
    "resize_pos_embed",
]


class ViTCheckpointError(BackboneError):
    """The checkpoint cannot be read, or does not fit the requested ViT exactly."""


@dataclasses.dataclass(frozen=True)
class LoadedViT:
    """A converted checkpoint: the config it was fitted to, and float32 numpy variables."""

    config: ViTConfig
    variables: dict[str, Any]
    format: str  # "timm", "vision_transformer" or "big_vision"
    checkpoint_image_size: int  # resolution of the stored position-embedding grid
    ignored: tuple[str, ...]  # classifier (and other-tower) tensors skipped
    path: str = ""
    sha256: str = ""




def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a `.npz`, `.safetensors` or torch state-dict file, as numpy arrays."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, for bf16 files)
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        if path.suffix == ".npz" or _is_npz(path):
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        from featdp.backbones.torch_checkpoint import load_torch_state_dict

        return load_torch_state_dict(path)
    except ImportError as err:
        raise ViTCheckpointError(f"reading {path} needs {err.name}: pip install {err.name}") from err
    except Exception as err:  # each reader has its own errors (SafetensorError, UnpicklingError, ...)
        raise ViTCheckpointError(f"cannot read {path} as a .npz, .safetensors or torch state dict: "
                                 f"{type(err).__name__}: {err}") from err


def _is_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        return f.read(9)[8:] == b"{"


def _is_npz(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return bool(names) and all(n.endswith(".npy") for n in names)


# ----------------------------------------------------------------------------------------------------
# Layout detection

@dataclasses.dataclass(frozen=True)
class _Layout:
    format: str
    prefix: str
    scanned: bool = False  # big_vision scan: one stacked tensor per block variable
    attn: str = ""
    norm2: str = ""
    mlp: str = ""

    def key(self, name: str) -> str:
        return self.prefix + name


_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _detect_layout(keys: Iterable[str]) -> _Layout:
    keys = set(keys)
    if "patch_embed.proj.weight" in keys:
        return _Layout("timm", "")
    for prefix in _NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in keys:
            scanned = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys
            block = f"{prefix}Transformer/encoderblock{'' if scanned else '_0'}/"

            def pick(names: tuple[str, str], leaf: str) -> str:
                return next((n for n in names if f"{block}{n}/{leaf}" in keys), names[0])

            attn = pick(("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0"), "query/kernel")
            big_vision = (prefix.startswith("params/") or scanned or attn.endswith("_0")
                          or f"{prefix}pos_embedding" in keys)
            if big_vision:
                return _Layout("big_vision", prefix, scanned, attn, pick(("LayerNorm_1", "LayerNorm_2"), "scale"),
                               pick(("MlpBlock_0", "MlpBlock_3"), "Dense_0/kernel"))
            return _Layout("vision_transformer", prefix, False, attn, pick(("LayerNorm_2", "LayerNorm_1"), "scale"),
                           pick(("MlpBlock_3", "MlpBlock_0"), "Dense_0/kernel"))
    sample = ", ".join(sorted(keys)[:8])
    raise ViTCheckpointError(
        "not a ViT checkpoint in a known layout: expected 'patch_embed.proj.weight' (timm) or "
        f"'[{'|'.join(p for p in _NPZ_PREFIXES if p)}]embedding/kernel' (vision_transformer/big_vision); "
        f"found {len(keys)} tensors: {sample}{' ...' if len(keys) > 8 else ''}")


def _ignored(layout: _Layout, key: str) -> bool:
    """Classifier tensors (and other towers of a two-tower checkpoint): skipped and reported."""
    if layout.format == "timm":
        return key.startswith(("head.", "pre_logits."))
    if not key.startswith(layout.prefix):
        return layout.prefix == "params/img/" and key.startswith("params/")
    return key[len(layout.prefix):].startswith(("head/", "pre_logits/"))


def _pos_key(layout: _Layout, keys: Iterable[str]) -> str:
    if layout.format == "timm":
        return "pos_embed"
    vit_key = layout.key("Transformer/posembed_input/pos_embedding")
    return vit_key if vit_key in set(keys) else layout.key("pos_embedding")


def _cls_key(layout: _Layout) -> str:
    return "cls_token" if layout.format == "timm" else layout.key("cls")


# ----------------------------------------------------------------------------------------------------
# Position embedding

def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres, edges clamped.

    Output sample j sits at source coordinate s = (j + ½)·n_in/n_out − ½, clamped to [0, n_in − 1],
    and takes (1 − f)·x[⌊s⌋] + f·x[⌊s⌋ + 1] with f = s − ⌊s⌋: torch's bilinear, align_corners=False,
    without antialiasing.
    """
    s = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = s - lo
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize_pos_embed(grid: np.ndarray, size: int) -> np.ndarray:
    """(g, g, D) position embeddings -> (size, size, D), bilinear (separable, float64 inside)."""
    g_h, g_w = grid.shape[:2]
    if (g_h, g_w) == (size, size):
        return grid
    rows, cols = linear_resize_matrix(g_h, size), linear_resize_matrix(g_w, size)
    out = np.einsum("ih,jw,hwd->ijd", rows, cols, grid.astype(np.float64))
    return out.astype(grid.dtype)


def _pos_geometry(pos_shape: tuple[int, ...], has_cls: bool, key: str) -> tuple[int, bool]:
    """(grid side g, whether the stored embedding has a class-token row) from its shape."""
    if len(pos_shape) != 3 or pos_shape[0] != 1:
        raise ViTCheckpointError(f"{key}: shape {pos_shape}, expected (1, tokens, width)")
    n = pos_shape[1]
    g = math.isqrt(n)
    if g * g == n and n > 1:
        return g, False
    g = math.isqrt(n - 1)
    if has_cls and g * g == n - 1:
        return g, True
    raise ViTCheckpointError(f"{key}: {n} positions is neither a square grid nor 1 + a square grid"
                             f"{'' if has_cls else ' (and the checkpoint has no class token)'}")


def _convert_pos(value: np.ndarray, covers_cls: bool, config: ViTConfig) -> np.ndarray:
    width = value.shape[-1]
    cls_row, grid = (value[:, :1], value[:, 1:]) if covers_cls else (np.zeros((1, 1, width), value.dtype), value)
    g = math.isqrt(grid.shape[1])
    grid = resize_pos_embed(grid.reshape(g, g, width), config.grid_size).reshape(1, -1, width)
    return np.concatenate([cls_row, grid], axis=1) if config.class_token else grid


# ----------------------------------------------------------------------------------------------------
# Mapping rules: (checkpoint key, expected shape, conversion to [(variable path, array)])

_Path = tuple[str, ...]
_Convert = Callable[[np.ndarray], list[tuple[_Path, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class _Rule:
    key: str
    shape: tuple[int, ...]
    convert: _Convert


def _to(path: _Path, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> _Convert:
    return lambda a: [(path, fn(a))]


def _timm_rules(c: ViTConfig) -> list[_Rule]:
    d, h, hd, m, p = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size
    rules = [
        _Rule("patch_embed.proj.weight", (d, 3, p, p), _to(("patch_embed", "kernel"), lambda w: w.transpose(2, 3, 1, 0))),
        _Rule("patch_embed.proj.bias", (d,), _to(("patch_embed", "bias"))),
        _Rule("norm.weight", (d,), _to(("norm", "scale"))),
        _Rule("norm.bias", (d,), _to(("norm", "bias"))),
    ]
    for i in range(c.depth):
        t, f = f"blocks.{i}.", f"block{i}"

        def qkv_kernel(w, f=f):  # (3D, D) rows [q; k; v], each (out, in) -> (in, heads, head_dim)
            return [((f, "attn", n, "kernel"), part.T.reshape(d, h, hd))
                    for n, part in zip(("query", "key", "value"), np.split(w, 3))]

        def qkv_bias(b, f=f):
            return [((f, "attn", n, "bias"), part.reshape(h, hd))
                    for n, part in zip(("query", "key", "value"), np.split(b, 3))]

        rules += [
            _Rule(t + "norm1.weight", (d,), _to((f, "norm1", "scale"))),
            _Rule(t + "norm1.bias", (d,), _to((f, "norm1", "bias"))),
            _Rule(t + "attn.qkv.weight", (3 * d, d), qkv_kernel),
            _Rule(t + "attn.qkv.bias", (3 * d,), qkv_bias),
            _Rule(t + "attn.proj.weight", (d, d), _to((f, "attn", "out", "kernel"), lambda w: w.T.reshape(h, hd, d))),
            _Rule(t + "attn.proj.bias", (d,), _to((f, "attn", "out", "bias"))),
            _Rule(t + "norm2.weight", (d,), _to((f, "norm2", "scale"))),
            _Rule(t + "norm2.bias", (d,), _to((f, "norm2", "bias"))),
            _Rule(t + "mlp.fc1.weight", (m, d), _to((f, "fc1", "kernel"), np.transpose)),
            _Rule(t + "mlp.fc1.bias", (m,), _to((f, "fc1", "bias"))),
            _Rule(t + "mlp.fc2.weight", (d, m), _to((f, "fc2", "kernel"), np.transpose)),
            _Rule(t + "mlp.fc2.bias", (d,), _to((f, "fc2", "bias"))),
        ]
    return rules


def _npz_block_tensors(c: ViTConfig, layout: _Layout) -> list[tuple[str, tuple[int, ...], _Path]]:
    """(name inside the block, per-block shape, variable path inside `block{i}`)."""
    d, h, hd, m = c.width, c.num_heads, c.head_dim, c.mlp_dim
    a, n2, mlp = layout.attn, layout.norm2, layout.mlp
    out = [
        ("LayerNorm_0/scale", (d,), ("norm1", "scale")),
        ("LayerNorm_0/bias", (d,), ("norm1", "bias")),
    ]
    for n in ("query", "key", "value"):
        out += [(f"{a}/{n}/kernel", (d, h, hd), ("attn", n, "kernel")),
                (f"{a}/{n}/bias", (h, hd), ("attn", n, "bias"))]
    return out + [
        (f"{a}/out/kernel", (h, hd, d), ("attn", "out", "kernel")),
        (f"{a}/out/bias", (d,), ("attn", "out", "bias")),
        (f"{n2}/scale", (d,), ("norm2", "scale")),
        (f"{n2}/bias", (d,), ("norm2", "bias")),
        (f"{mlp}/Dense_0/kernel", (d, m), ("fc1", "kernel")),
        (f"{mlp}/Dense_0/bias", (m,), ("fc1", "bias")),
        (f"{mlp}/Dense_1/kernel", (m, d), ("fc2", "kernel")),
        (f"{mlp}/Dense_1/bias", (d,), ("fc2", "bias")),
    ]


def _npz_rules(c: ViTConfig, layout: _Layout) -> list[_Rule]:
    d, p = c.width, c.patch_size
    rules = [
        _Rule(layout.key("embedding/kernel"), (p, p, 3, d), _to(("patch_embed", "kernel"))),
        _Rule(layout.key("embedding/bias"), (d,), _to(("patch_embed", "bias"))),
        _Rule(layout.key("Transformer/encoder_norm/scale"), (d,), _to(("norm", "scale"))),
        _Rule(layout.key("Transformer/encoder_norm/bias"), (d,), _to(("norm", "bias"))),
    ]
    for name, shape, path in _npz_block_tensors(c, layout):
        if layout.scanned:
            def per_block(a, path=path):
                return [((f"block{i}", *path), a[i]) for i in range(c.depth)]

            rules.append(_Rule(layout.key(f"Transformer/encoderblock/{name}"), (c.depth, *shape), per_block))
        else:
            rules += [_Rule(layout.key(f"Transformer/encoderblock_{i}/{name}"), shape, _to((f"block{i}", *path)))
                      for i in range(c.depth)]
    return rules


def _rules(c: ViTConfig, layout: _Layout) -> list[_Rule]:
    return _timm_rules(c) if layout.format == "timm" else _npz_rules(c, layout)


def expected_checkpoint_shapes(config: ViTConfig, layout: str = "timm") -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` has in `layout` ("timm", "vision_transformer",
    "big_vision", "big_vision_scan"), classifier excluded, at the config's image size."""
    layouts = {
        "timm": _Layout("timm", ""),
        "vision_transformer": _Layout("vision_transformer", "", False, "MultiHeadDotProductAttention_1",
                                      "LayerNorm_2", "MlpBlock_3"),
        "big_vision": _Layout("big_vision", "params/", False, "MultiHeadDotProductAttention_0",
                              "LayerNorm_1", "MlpBlock_0"),
    }
    layouts["big_vision_scan"] = dataclasses.replace(layouts["big_vision"], scanned=True)
    lay = layouts[layout]
    shapes = {r.key: r.shape for r in _rules(config, lay)}
    d, g2 = config.width, config.grid_size**2
    if config.class_token:
        shapes[_cls_key(lay)] = (1, 1, d)
    pos_covers_cls = lay.format != "big_vision" and config.class_token
    pos_key = "pos_embed" if lay.format == "timm" else lay.key(
        "Transformer/posembed_input/pos_embedding" if lay.format == "vision_transformer" else "pos_embedding")
    shapes[pos_key] = (1, g2 + int(pos_covers_cls), d)
    return shapes


# ----------------------------------------------------------------------------------------------------
# Conversion

def _head(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _describe(tensors: Mapping[str, np.ndarray], layout: _Layout) -> str:
    """What the checkpoint looks like (width, depth, patch) and which registered ViT has that shape."""
    try:
        if layout.format == "timm":
            width, _, patch, _ = tensors["patch_embed.proj.weight"].shape
            depth = len({k.split(".")[1] for k in tensors if k.startswith("blocks.")})
        else:
            patch, _, _, width = tensors[layout.key("embedding/kernel")].shape
            stacked = layout.key("Transformer/encoderblock/LayerNorm_0/scale")
            depth = (tensors[stacked].shape[0] if stacked in tensors else
                     len({m.group(1) for k in tensors if (m := re.search(r"encoderblock_(\d+)/", k))}))
    except (KeyError, ValueError):
        return ""
    like = [n for n, c in CONFIGS.items() if (c.width, c.depth, c.patch_size) == (width, depth, patch)]
    return (f"\n  the checkpoint has width {width}, depth {depth}, patch {patch}"
            + (f": that is {' or '.join(like)}" if like else ""))


def convert_checkpoint(tensors: Mapping[str, np.ndarray], config: ViTConfig, image_size: int | None = None,
                       pool: str | None = None, gelu_approximate: bool | None = None) -> LoadedViT:
    """Map checkpoint tensors onto `ViT` variables (float32 numpy) for the architecture `config`.

    `image_size` None keeps the checkpoint's resolution (position-embedding grid × patch size); `pool`
    None is "token" when the checkpoint has a class token, else "gap"; `gelu_approximate` None keeps
    `config`'s. The returned config carries these choices.
    """
    layout = _detect_layout(tensors)
    has_cls = _cls_key(layout) in tensors
    pos_key = _pos_key(layout, tensors)
    if pos_key not in tensors:
        raise ViTCheckpointError(f"checkpoint ({layout.format} layout) has no position embedding {pos_key!r}"
                                 " (only learned position embeddings are supported)")
    grid, pos_covers_cls = _pos_geometry(tuple(tensors[pos_key].shape), has_cls, pos_key)
    if pool is None:
        pool = "token" if has_cls else "gap"
    if pool not in POOLS:
        raise ViTCheckpointError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "token" and not has_cls:
        raise ViTCheckpointError(f"pool='token' needs a class token, and the checkpoint has no {_cls_key(layout)!r}; "
                                 "use pool='gap'")
    stored_size = grid * config.patch_size
    size = stored_size if image_size is None else int(image_size)
    if size <= 0 or size % config.patch_size:
        raise ViTCheckpointError(f"image_size must be a positive multiple of the patch size "
                                 f"{config.patch_size}, got {image_size}")
    config = dataclasses.replace(
        config, image_size=size, class_token=has_cls, pool=pool,
        gelu_approximate=config.gelu_approximate if gelu_approximate is None else bool(gelu_approximate))

    d = config.width
    rules = _rules(config, layout)
    pos_shape = (1, grid * grid + int(pos_covers_cls), d)
    rules.append(_Rule(pos_key, pos_shape, _to(("pos_embed",), lambda a: _convert_pos(a, pos_covers_cls, config))))
    if has_cls:
        rules.append(_Rule(_cls_key(layout), (1, 1, d), _to(("cls_token",))))

    problems: list[str] = []
    missing = [r.key for r in rules if r.key not in tensors]
    used = {r.key for r in rules}
    ignored = tuple(sorted(k for k in tensors if k not in used and _ignored(layout, k)))
    unexpected = sorted(set(tensors) - used - set(ignored))
    wrong = [f"{r.key} {tuple(tensors[r.key].shape)} (expected {r.shape})"
             for r in rules if r.key in tensors and tuple(tensors[r.key].shape) != r.shape]
    if missing:
        problems.append(f"missing from checkpoint: {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected checkpoint tensors: {_head(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_head(wrong, 4)}")
    if problems:
        raise ViTCheckpointError(
            f"checkpoint ({layout.format} layout) does not match {config.name} (width {d}, depth "
            f"{config.depth}, {config.num_heads} heads, MLP {config.mlp_dim}, patch {config.patch_size}):\n  "
            + "\n  ".join(problems) + _describe(tensors, layout))

    params: dict[str, Any] = {}
    filled: set[_Path] = set()
    for rule in rules:
        for path, value in rule.convert(np.asarray(tensors[rule.key], dtype=np.float32)):
            if path in filled:
                raise AssertionError(f"internal error: {'/'.join(path)} filled twice")
            filled.add(path)
            node = params
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
    variables = {"params": params}
    _check_against_model(variables, config)
    return LoadedViT(config, variables, layout.format, stored_size, ignored)


def _check_against_model(variables: dict[str, Any], config: ViTConfig) -> None:
    """The converted tree must be exactly the model's (catches a rule table out of step with `ViT`)."""
    import jax
    import jax.numpy as jnp

    from featdp.backbones.vit import ViT

    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda images: ViT(config).init(jax.random.key(0), images), x)
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise AssertionError(f"internal error: converted variables differ from the model: {diff[:6]}")


def load_vit_checkpoint(path: str | os.PathLike | None, config: ViTConfig, image_size: int | None = None,
                        pool: str | None = None, gelu_approximate: bool | None = None) -> LoadedViT:
    """Read, check and convert a ViT checkpoint file (see `convert_checkpoint` for the options)."""
    if path is None:
        raise BackboneError(f"{config.name} needs a checkpoint: {checkpoint_sources(config.name)}")
    if not Path(path).is_file():
        raise BackboneError(f"{config.name} checkpoint not found: {path} is not a file; "
                            f"pass --checkpoint PATH to a downloaded .npz or .safetensors")
    loaded = convert_checkpoint(read_checkpoint(path), config, image_size, pool, gelu_approximate)
    return dataclasses.replace(loaded, path=str(path), sha256=file_sha256(path))
