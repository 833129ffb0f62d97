"""ViT checkpoints -> `featdp.extraction.backbones.vit.ViT` variables, without torch or TensorFlow.

Layouts read (by key names, whatever the file's extension):

* timm (`.safetensors` through the safetensors package's numpy API; `.pth`/`.bin` through the torch-free
  reader of featdp.extraction.backbones.torch_checkpoint): `patch_embed.proj.weight` (D, 3, p, p) [+ `.bias`],
  `cls_token`, [`reg_token` (1, R, D)], `pos_embed` (1, [1 +] g², D), [`norm_pre`],
  `blocks.N.{norm1,norm2}.{weight,bias}`, `blocks.N.attn.qkv.weight` (3D, D) with q, k, v stacked in
  that order, `blocks.N.attn.proj`, [`blocks.N.ls1.gamma`, `.ls2.gamma`], `blocks.N.mlp.{fc1,fc2}`
  (SwiGLU: fc1 (2m, D) packs both branches), `norm.{weight,bias}`, [`attn_pool.{latent, q, kv, proj,
  norm, mlp.fc1, mlp.fc2}` (the MAP head)], [`head` (the CLIP projection, when the features are taken
  after it)]. torch Linear weights are (out, in): transposed here.
* OpenAI CLIP / OpenCLIP state dicts (`[module.]visual.conv1.weight`, `visual.class_embedding`,
  `visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.N.{ln_1, attn.in_proj_*,
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `visual.ln_post`, `visual.proj` (D, E)): renamed to the
  timm layout as timm's `_convert_openai_clip` does (the projection becomes `head`, bias 0); the text
  tower is skipped. OpenCLIP models built on a timm trunk (`visual.trunk.*`, e.g. SigLIP): the trunk.
* The original DINOv2 `.pth` (`mask_token`, `register_tokens`, `blocks.N.mlp.w12`/`w3` for SwiGLU,
  optionally chunked as `blocks.C.N.`): renamed to the timm layout; `mask_token` is skipped.
* google-research/vision_transformer `.npz` (optionally under `opt/target/`): `embedding/kernel`
  (p, p, 3, D), `cls`, `Transformer/posembed_input/pos_embedding` (1, 1 + g², D),
  `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3}`,
  `Transformer/encoder_norm`; attention kernels are already per head: query/key/value (D, H, d),
  out (H, d, D).
* big_vision `.npz` (under `params/` or, for a two-tower model such as SigLIP, `params/img/`): the same,
  except the block's children are `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
  MlpBlock_0`, the position embedding is `pos_embedding` (1, g², D) and covers the patches only (the
  class token is concatenated after it is added: here its row of `pos_embed` is zero), a scanned
  encoder stores each block tensor once as `Transformer/encoderblock/...` with a leading depth axis,
  and a MAP head is `MAPHead_0/{probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}`.

Every checkpoint tensor is used exactly once; only the classifier (`head`, unless it is the CLIP
projection the features are taken after, and `pre_logits`, the tanh "representation" layer of the
original ImageNet-21k checkpoints, which timm drops too: features are taken before it) and the parts
outside the image tower (text towers, DINOv2's `mask_token`) are skipped; they are listed in
`LoadedViT.ignored`. Anything else missing, unexpected or of the wrong shape is reported all at once in
a `ViTCheckpointError`, whose first line names the first tensor that differs. A position-embedding grid
that differs from the requested resolution is resampled (`ViTConfig.pos_resize`: bilinear, torch's
`interpolate(mode="bilinear", align_corners=False)` without antialiasing, what timm uses for the `.npz`
files; bicubic, torch's bicubic; or bicubic with DINOv2's scale factor).

A checkpoint is a local path or `hf-hub:ORG/NAME[@REVISION][:FILE]` (featdp.extraction.backbones.hf_hub).
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

from featdp.extraction.backbones import hf_hub
from featdp.extraction.backbones.registry import BackboneError
from featdp.extraction.backbones.vit import ALL_CONFIGS, CONFIGS, POOLS, ViTConfig, checkpoint_sources

__all__ = [
    "CheckpointFile",
    "LoadedViT",
    "ViTCheckpointError",
    "convert_checkpoint",
    "cubic_resize_matrix",
    "expected_checkpoint_shapes",
    "linear_resize_matrix",
    "load_vit_checkpoint",
    "read_checkpoint",
    "resize_pos_embed",
    "resolve_checkpoint_file",
]


class ViTCheckpointError(BackboneError):
    """The checkpoint cannot be read, or does not fit the requested ViT exactly."""


@dataclasses.dataclass(frozen=True)
class LoadedViT:
    """A converted checkpoint: the config it was fitted to, and float32 numpy variables."""

    config: ViTConfig
    variables: dict[str, Any]
    format: str  # "timm", "vision_transformer" or "big_vision" (+ " (from open_clip)" / " (from dinov2)")
    checkpoint_image_size: int  # resolution of the stored position-embedding grid
    ignored: tuple[str, ...]  # classifier (and other-tower) tensors skipped
    path: str = ""
    sha256: str = ""


@dataclasses.dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint resolved to a local file: `name` is what gets recorded (the path, or
    `hf-hub:ORG/NAME@<commit>:FILE`)."""

    path: Path
    name: str
    hub: dict | None = None  # repo_id, revision, commit, filename for an hf-hub: checkpoint

    @property
    def directory(self) -> Path:
        return self.path.parent


def resolve_checkpoint_file(checkpoint: str | os.PathLike | CheckpointFile | None,
                            config: ViTConfig) -> CheckpointFile:
    """A local file for `checkpoint` (downloading an `hf-hub:` one into the cache unless offline)."""
    if isinstance(checkpoint, CheckpointFile):
        return checkpoint
    if checkpoint is None:
        raise BackboneError(f"{config.name} needs a checkpoint: {checkpoint_sources(config.name)}")
    if hf_hub.is_hub_spec(checkpoint):
        found = hf_hub.download(str(checkpoint))
        return CheckpointFile(found.path, found.name, found.describe())
    path = Path(checkpoint)
    if not path.is_file():
        raise BackboneError(f"{config.name} checkpoint not found: {checkpoint} is not a file; "
                            f"pass --checkpoint PATH to a downloaded .npz or .safetensors, or hf-hub:ORG/NAME")
    return CheckpointFile(path, str(checkpoint))


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
        from featdp.extraction.backbones.torch_checkpoint import load_torch_state_dict

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
# Other torch layouts -> timm names

@dataclasses.dataclass(frozen=True)
class _Renamed:
    tensors: dict[str, np.ndarray]
    original: dict[str, str | None]  # key here -> key in the file (None: made up, e.g. a zero bias)
    dropped: tuple[str, ...]  # file keys outside the image tower
    source: str  # "" (as stored), "open_clip", "dinov2"


# OpenAI CLIP / OpenCLIP visual tower -> timm (the order matters: "ln_" after "ln_pre"/"ln_post").
_CLIP_RENAMES = (("conv1", "patch_embed.proj"), ("positional_embedding", "pos_embed"),
                 ("transformer.resblocks.", "blocks."), ("ln_pre", "norm_pre"), ("ln_post", "norm"),
                 ("ln_", "norm"), ("in_proj_", "qkv."), ("out_proj", "proj"), ("mlp.c_fc", "mlp.fc1"),
                 ("mlp.c_proj", "mlp.fc2"), ("ls_1", "ls1"), ("ls_2", "ls2"))


def _rename_to_timm(tensors: Mapping[str, np.ndarray]) -> _Renamed:
    keys = set(tensors)
    for prefix in ("visual.", "module.visual.", ""):
        if f"{prefix}class_embedding" in keys and f"{prefix}conv1.weight" in keys:
            out, original = {}, {}
            for key, value in tensors.items():
                if not key.startswith(prefix):
                    continue
                name = key[len(prefix):]
                for old, new in _CLIP_RENAMES:
                    name = name.replace(old, new)
                if name == "proj":  # x @ proj, (D, E): a Linear (E, D) without bias
                    name, value = "head.weight", np.ascontiguousarray(value.T)
                    out["head.bias"], original["head.bias"] = np.zeros(value.shape[0], value.dtype), None
                elif name == "class_embedding":
                    name, value = "cls_token", value.reshape(1, 1, -1)
                elif name == "pos_embed" and value.ndim == 2:
                    value = value[None]
                out[name], original[name] = value, key
            dropped = tuple(sorted(k for k in keys if not k.startswith(prefix))) if prefix else ()
            return _Renamed(out, original, dropped, "open_clip")
    for prefix in ("visual.trunk.", "module.visual.trunk."):
        if f"{prefix}patch_embed.proj.weight" in keys:
            out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            return _Renamed(out, {k[len(prefix):]: k for k in keys if k.startswith(prefix)},
                            tuple(sorted(k for k in keys if not k.startswith(prefix))), "open_clip")
    if "patch_embed.proj.weight" in keys and ("mask_token" in keys or "register_tokens" in keys
                                             or any(".mlp.w12." in k for k in keys)):
        out, original = {}, {}
        for key, value in tensors.items():
            if key == "mask_token":
                continue
            name = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # block_chunks > 0
            name = "reg_token" if name == "register_tokens" else name
            name = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", name)
            name = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", name)
            out[name], original[name] = value, key
        return _Renamed(out, original, tuple(k for k in ("mask_token",) if k in keys), "dinov2")
    return _Renamed(dict(tensors), {k: k for k in tensors}, (), "")


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
    hint = ""
    if any(k.startswith(("vision_model.", "embeddings.patch_embeddings", "vision_tower.")) for k in keys):
        hint = ("\n  this looks like a Hugging Face transformers checkpoint, which is not read: use the timm or "
                "OpenCLIP file of the same weights (e.g. open_clip_model.safetensors, or a timm/ repository)")
    raise ViTCheckpointError(
        "not a ViT checkpoint in a known layout: expected 'patch_embed.proj.weight' (timm, DINOv2), "
        "'visual.conv1.weight' (OpenAI CLIP, OpenCLIP) or "
        f"'[{'|'.join(p for p in _NPZ_PREFIXES if p)}]embedding/kernel' (vision_transformer/big_vision); "
        f"found {len(keys)} tensors: {sample}{' ...' if len(keys) > 8 else ''}{hint}")


def _ignored(layout: _Layout, key: str, config: ViTConfig) -> bool:
    """Classifier tensors (and other towers of a two-tower checkpoint): skipped and reported."""
    if layout.format == "timm":
        return key.startswith(("pre_logits.",)) or (key.startswith("head.") and not config.projection_dim)
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


def cubic_resize_matrix(n_in: int, n_out: int, scale: float | None = None, a: float = -0.75) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D bicubic interpolation (align_corners=False, no antialias).

    Output sample j reads source coordinate s = (j + ½)/scale − ½ (not clamped), scale = n_out/n_in
    unless given (torch uses the caller's scale factor when there is one, as DINOv2's interpolation
    does), and mixes x[⌊s⌋ − 1 … ⌊s⌋ + 2], indices clamped to the edges, with Keys' cubic kernel (a).
    """
    scale = n_out / n_in if scale is None else scale
    s = (np.arange(n_out) + 0.5) / scale - 0.5
    lo = np.floor(s).astype(np.int64)
    t = s - lo

    def near(x):  # |x| ≤ 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    m = np.zeros((n_out, n_in))
    for offset, w in zip((-1, 0, 1, 2), weights):
        np.add.at(m, (np.arange(n_out), np.clip(lo + offset, 0, n_in - 1)), w)
    return m


def resize_pos_embed(grid: np.ndarray, size: int, method: str = "bilinear") -> np.ndarray:
    """(g, g, D) position embeddings -> (size, size, D) (separable, float64 inside).

    method: "bilinear" (linear_resize_matrix), "bicubic" (cubic_resize_matrix to the output size), or
    "bicubic_dinov2" (the same with DINOv2's scale factor (size + 0.1)/g)."""
    g_h, g_w = grid.shape[:2]
    if (g_h, g_w) == (size, size):
        return grid
    if method == "bilinear":
        rows, cols = linear_resize_matrix(g_h, size), linear_resize_matrix(g_w, size)
    elif method == "bicubic":
        rows, cols = cubic_resize_matrix(g_h, size), cubic_resize_matrix(g_w, size)
    elif method == "bicubic_dinov2":
        rows = cubic_resize_matrix(g_h, size, scale=(size + 0.1) / g_h)
        cols = cubic_resize_matrix(g_w, size, scale=(size + 0.1) / g_w)
    else:
        raise ValueError(f"unknown position-embedding resize {method!r}")
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
    grid = resize_pos_embed(grid.reshape(g, g, width), config.grid_size, config.pos_resize).reshape(1, -1, width)
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


def _linear(key: str, path: _Path, n_out: int, n_in: int, out_shape: tuple[int, ...] | None = None,
            in_shape: tuple[int, ...] | None = None, bias: bool = True) -> list[_Rule]:
    """A torch Linear (out, in) -> a Flax Dense/DenseGeneral kernel (in..., out...) [+ bias (out...)]."""
    out_shape, in_shape = out_shape or (n_out,), in_shape or (n_in,)
    rules = [_Rule(f"{key}.weight", (n_out, n_in),
                   _to((*path, "kernel"), lambda w: w.T.reshape(*in_shape, *out_shape)))]
    if bias:
        rules.append(_Rule(f"{key}.bias", (n_out,), _to((*path, "bias"), lambda b: b.reshape(out_shape))))
    return rules


def _norm(key: str, path: _Path, d: int) -> list[_Rule]:
    return [_Rule(f"{key}.weight", (d,), _to((*path, "scale"))), _Rule(f"{key}.bias", (d,), _to((*path, "bias")))]


def _mlp_hidden(c: ViTConfig) -> int:
    return 2 * c.mlp_dim if c.activation == "swiglu" else c.mlp_dim


def _timm_rules(c: ViTConfig) -> list[_Rule]:
    d, h, hd, m, p = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size
    rules = [_Rule("patch_embed.proj.weight", (d, 3, p, p),
                   _to(("patch_embed", "kernel"), lambda w: w.transpose(2, 3, 1, 0)))]
    if c.patch_bias:
        rules.append(_Rule("patch_embed.proj.bias", (d,), _to(("patch_embed", "bias"))))
    if c.num_registers:
        rules.append(_Rule("reg_token", (1, c.num_registers, d), _to(("reg_token",))))
    if c.pre_norm:
        rules += _norm("norm_pre", ("norm_pre",), d)
    for i in range(c.depth):
        t, f = f"blocks.{i}.", f"block{i}"
        rules += _norm(t + "norm1", (f, "norm1"), d)
        rules += _linear(t + "attn.qkv", (f, "attn", "qkv"), 3 * d, d, out_shape=(3, h, hd))
        rules += _linear(t + "attn.proj", (f, "attn", "out"), d, d, in_shape=(h, hd))
        rules += _norm(t + "norm2", (f, "norm2"), d)
        rules += _linear(t + "mlp.fc1", (f, "mlp", "fc1"), _mlp_hidden(c), d)
        rules += _linear(t + "mlp.fc2", (f, "mlp", "fc2"), d, m)
        if c.layer_scale:
            rules += [_Rule(t + "ls1.gamma", (d,), _to((f, "ls1"))), _Rule(t + "ls2.gamma", (d,), _to((f, "ls2")))]
    rules += _norm("norm", ("norm",), d)
    if c.pool == "map":
        a = ("map_head",)
        rules.append(_Rule("attn_pool.latent", (1, 1, d), _to((*a, "probe"))))
        rules += _linear("attn_pool.q", (*a, "query"), d, d, out_shape=(h, hd))
        rules += _linear("attn_pool.kv", (*a, "kv"), 2 * d, d, out_shape=(2, h, hd))
        rules += _linear("attn_pool.proj", (*a, "out"), d, d, in_shape=(h, hd))
        rules += _norm("attn_pool.norm", (*a, "norm"), d)
        rules += _linear("attn_pool.mlp.fc1", (*a, "mlp", "fc1"), _mlp_hidden(c), d)
        rules += _linear("attn_pool.mlp.fc2", (*a, "mlp", "fc2"), d, m)
    if c.projection_dim:
        pooled = 2 * d if c.pool == "token+gap" else d
        rules += _linear("head", ("head",), c.projection_dim, pooled)
    return rules


def _npz_attention(name: str, d: int, h: int, hd: int, path: _Path) -> list[tuple[str, tuple[int, ...], _Path]]:
    """Flax MultiHeadDotProductAttention tensors; q, k, v land in separate slots, fused afterwards."""
    out = []
    for n in ("query", "key", "value"):
        out += [(f"{name}/{n}/kernel", (d, h, hd), (*path, n, "kernel")),
                (f"{name}/{n}/bias", (h, hd), (*path, n, "bias"))]
    return out + [(f"{name}/out/kernel", (h, hd, d), (*path, "out", "kernel")),
                  (f"{name}/out/bias", (d,), (*path, "out", "bias"))]


def _npz_mlp(name: str, d: int, m: int, path: _Path) -> list[tuple[str, tuple[int, ...], _Path]]:
    return [(f"{name}/Dense_0/kernel", (d, m), (*path, "fc1", "kernel")),
            (f"{name}/Dense_0/bias", (m,), (*path, "fc1", "bias")),
            (f"{name}/Dense_1/kernel", (m, d), (*path, "fc2", "kernel")),
            (f"{name}/Dense_1/bias", (d,), (*path, "fc2", "bias"))]


def _npz_block_tensors(c: ViTConfig, layout: _Layout) -> list[tuple[str, tuple[int, ...], _Path]]:
    """(name inside the block, per-block shape, variable path inside `block{i}`)."""
    d, h, hd, m = c.width, c.num_heads, c.head_dim, c.mlp_dim
    return [
        ("LayerNorm_0/scale", (d,), ("norm1", "scale")),
        ("LayerNorm_0/bias", (d,), ("norm1", "bias")),
        *_npz_attention(layout.attn, d, h, hd, ("attn",)),
        (f"{layout.norm2}/scale", (d,), ("norm2", "scale")),
        (f"{layout.norm2}/bias", (d,), ("norm2", "bias")),
        *_npz_mlp(layout.mlp, d, m, ("mlp",)),
    ]


def _npz_rules(c: ViTConfig, layout: _Layout) -> list[_Rule]:
    d, p = c.width, c.patch_size
    rules = [_Rule(layout.key("embedding/kernel"), (p, p, 3, d), _to(("patch_embed", "kernel")))]
    if c.patch_bias:
        rules.append(_Rule(layout.key("embedding/bias"), (d,), _to(("patch_embed", "bias"))))
    for name, shape, path in _npz_block_tensors(c, layout):
        if layout.scanned:
            def per_block(a, path=path):
                return [((f"block{i}", *path), a[i]) for i in range(c.depth)]

            rules.append(_Rule(layout.key(f"Transformer/encoderblock/{name}"), (c.depth, *shape), per_block))
        else:
            rules += [_Rule(layout.key(f"Transformer/encoderblock_{i}/{name}"), shape, _to((f"block{i}", *path)))
                      for i in range(c.depth)]
    rules += [_Rule(layout.key("Transformer/encoder_norm/scale"), (d,), _to(("norm", "scale"))),
              _Rule(layout.key("Transformer/encoder_norm/bias"), (d,), _to(("norm", "bias")))]
    if c.pool == "map":
        head = layout.key("MAPHead_0/")
        rules.append(_Rule(head + "probe", (1, 1, d), _to(("map_head", "probe"))))
        tensors = (_npz_attention("MultiHeadDotProductAttention_0", d, c.num_heads, c.head_dim, ("map_head",))
                   + [("LayerNorm_0/scale", (d,), ("map_head", "norm", "scale")),
                      ("LayerNorm_0/bias", (d,), ("map_head", "norm", "bias"))]
                   + _npz_mlp("MlpBlock_0", d, c.mlp_dim, ("map_head", "mlp")))
        rules += [_Rule(head + name, shape, _to(path)) for name, shape, path in tensors]
    return rules


def _rules(c: ViTConfig, layout: _Layout) -> list[_Rule]:
    if layout.format != "timm":
        if c.num_registers or c.layer_scale or c.pre_norm or c.projection_dim or c.activation == "swiglu":
            raise ViTCheckpointError(f"{c.name} has no {layout.format} .npz layout (registers, layer scale, "
                                     "pre-norm, a projection or SwiGLU): use a timm/OpenCLIP/DINOv2 checkpoint")
        return _npz_rules(c, layout)
    return _timm_rules(c)


def _timm_pos_shape(config: ViTConfig) -> tuple[int, int, int]:
    # timm stores no class row when there is no class token, or with registers (`no_embed_class`).
    covers_cls = config.class_token and not config.num_registers
    return (1, config.grid_size**2 + int(covers_cls), config.width)


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
    if lay.format == "timm":
        shapes["pos_embed"] = _timm_pos_shape(config)
    elif lay.format == "vision_transformer":
        shapes[lay.key("Transformer/posembed_input/pos_embedding")] = (1, g2 + int(config.class_token), d)
    else:
        shapes[lay.key("pos_embedding")] = (1, g2, d)
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
    features = {"layer scale": any(".ls1." in k for k in tensors), "registers": "reg_token" in tensors,
                "pre-norm": "norm_pre.weight" in tensors,
                "MAP head": any(k.startswith("attn_pool.") or "MAPHead_0/" in k for k in tensors),
                "class token": _cls_key(layout) in tensors}
    has = [k for k, v in features.items() if v]

    def same(c: ViTConfig) -> bool:
        return ((c.width, c.depth, c.patch_size) == (width, depth, patch)
                and (c.layer_scale, bool(c.num_registers), c.pre_norm, c.pool == "map")
                == (features["layer scale"], features["registers"], features["pre-norm"], features["MAP head"]))

    like = [n for n, c in {**CONFIGS, **ALL_CONFIGS}.items() if same(c)]
    return (f"\n  the checkpoint has width {width}, depth {depth}, patch {patch}"
            + (f", {', '.join(has)}" if has else "")
            + (f": that is the shape of {' or '.join(sorted(like))}" if like else ""))


def _fuse_attention(params: dict[str, Any]) -> None:
    """q, k, v kernels and biases stored apart (the .npz layouts) -> the fused `qkv` (and the MAP
    head's `kv`) variables of the model: kernels stacked on a new axis after the input one."""
    def fuse(node: dict, names: tuple[str, ...], into: str) -> None:
        if all(n in node for n in names):
            parts = [node.pop(n) for n in names]
            node[into] = {"kernel": np.stack([p["kernel"] for p in parts], axis=1),
                          "bias": np.stack([p["bias"] for p in parts], axis=0)}

    for name, node in params.items():
        if name.startswith("block") and isinstance(node.get("attn"), dict):
            fuse(node["attn"], ("query", "key", "value"), "qkv")
    if isinstance(params.get("map_head"), dict):
        fuse(params["map_head"], ("key", "value"), "kv")


def convert_checkpoint(tensors: Mapping[str, np.ndarray], config: ViTConfig, image_size: int | None = None,
                       pool: str | None = None, gelu_approximate: bool | None = None) -> LoadedViT:
    """Map checkpoint tensors onto `ViT` variables (float32 numpy) for the architecture `config`.

    `image_size` None keeps the checkpoint's resolution (position-embedding grid × patch size), or
    `config.image_size` when `config.resolution_from_checkpoint` is False; `pool` None is the config's
    ("token" becomes "gap" when the checkpoint has no class token); `gelu_approximate` None keeps
    `config`'s. The returned config carries these choices.
    """
    renamed = _rename_to_timm(tensors)
    tensors, original = renamed.tensors, renamed.original
    layout = _detect_layout(tensors)
    fmt = layout.format + (f" (from {renamed.source})" if renamed.source else "")

    def orig(key: str) -> str:
        return original.get(key) or key

    has_cls = _cls_key(layout) in tensors
    pos_key = _pos_key(layout, tensors)
    if pos_key not in tensors:
        raise ViTCheckpointError(f"checkpoint ({fmt} layout) has no position embedding {orig(pos_key)!r}"
                                 " (only learned position embeddings are supported)")
    grid, pos_covers_cls = _pos_geometry(tuple(tensors[pos_key].shape), has_cls, orig(pos_key))
    if pool is None:
        pool = "gap" if config.pool == "token" and not has_cls else config.pool
    if pool not in POOLS:
        raise ViTCheckpointError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool in ("token", "token+gap") and not has_cls:
        raise ViTCheckpointError(f"pool={pool!r} needs a class token, and the checkpoint has no "
                                 f"{orig(_cls_key(layout))!r}; use pool='gap'" + _describe(tensors, layout))
    stored_size = grid * config.patch_size
    default_size = stored_size if config.resolution_from_checkpoint else config.image_size
    size = default_size if image_size is None else int(image_size)
    if size <= 0 or size % config.patch_size:
        raise ViTCheckpointError(f"image_size must be a positive multiple of the patch size "
                                 f"{config.patch_size}, got {image_size}")
    config = dataclasses.replace(
        config, image_size=size, class_token=has_cls, pool=pool,
        gelu_approximate=config.gelu_approximate if gelu_approximate is None else bool(gelu_approximate))

    d = config.width
    rules = _rules(config, layout)
    pos_shape = (1, grid * grid + int(pos_covers_cls), d)
    rules.insert(0, _Rule(pos_key, pos_shape, _to(("pos_embed",), lambda a: _convert_pos(a, pos_covers_cls, config))))
    if has_cls:
        rules.insert(0, _Rule(_cls_key(layout), (1, 1, d), _to(("cls_token",))))

    used = {r.key for r in rules}
    ignored_here = sorted(k for k in tensors if k not in used and _ignored(layout, k, config))
    ignored = tuple(sorted(orig(k) for k in ignored_here if original.get(k, k) is not None)) + _summarize(
        renamed.dropped)
    unexpected = sorted(orig(k) for k in set(tensors) - used - set(ignored_here))
    missing = [orig(r.key) for r in rules if r.key not in tensors]
    wrong = [f"{orig(r.key)} {tuple(tensors[r.key].shape)} (expected {r.shape})"
             for r in rules if r.key in tensors and tuple(tensors[r.key].shape) != r.shape]
    first = next((f"{orig(r.key)} is missing" if r.key not in tensors else
                  f"{orig(r.key)} has shape {tuple(tensors[r.key].shape)}, expected {r.shape}"
                  for r in rules if r.key not in tensors or tuple(tensors[r.key].shape) != r.shape), None)
    if first is None and unexpected:
        first = f"{unexpected[0]} is not part of {config.name}"
    if first is not None:
        problems = [f"first difference: {first}"]
        if missing:
            problems.append(f"missing from checkpoint: {_head(missing)}")
        if unexpected:
            problems.append(f"unexpected checkpoint tensors: {_head(unexpected)}")
        if wrong:
            problems.append(f"shape mismatch: {_head(wrong, 4)}")
        raise ViTCheckpointError(
            f"checkpoint ({fmt} layout) does not match {config.name} (width {d}, depth "
            f"{config.depth}, {config.num_heads} heads, MLP {config.mlp_dim}, patch {config.patch_size}"
            f"{_features_of(config)}):\n  " + "\n  ".join(problems) + _describe(tensors, layout))

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
    _fuse_attention(params)
    variables = {"params": params}
    _check_against_model(variables, config)
    return LoadedViT(config, variables, fmt, stored_size, ignored)


def _summarize(keys: tuple[str, ...], limit: int = 8) -> tuple[str, ...]:
    """Skipped tensors outside the image tower: each, or (a text tower's hundreds) one entry per
    top-level name with its count."""
    if len(keys) <= limit:
        return tuple(keys)
    groups: dict[str, int] = {}
    for key in keys:
        top = key.split(".")[0].split("/")[0]
        groups[top] = groups.get(top, 0) + 1
    return tuple(f"{top}.* ({n} tensors)" if n > 1 else top for top, n in sorted(groups.items()))


def _features_of(config: ViTConfig) -> str:
    parts = [name for name, on in (("pre-norm", config.pre_norm), ("layer scale", config.layer_scale),
                                   (f"{config.num_registers} registers", config.num_registers),
                                   ("MAP head", config.pool == "map"), ("SwiGLU", config.activation == "swiglu"),
                                   (f"projection to {config.projection_dim}", config.projection_dim)) if on]
    return "".join(f", {p}" for p in parts)


def _check_against_model(variables: dict[str, Any], config: ViTConfig) -> None:
    """The converted tree must be exactly the model's (catches a rule table out of step with `ViT`)."""
    import jax
    import jax.numpy as jnp

    from featdp.extraction.backbones.vit import ViT

    x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda images: ViT(config).init(jax.random.key(0), images), x)
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract)}
    got = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))
        raise AssertionError(f"internal error: converted variables differ from the model: {diff[:6]}")


def load_vit_checkpoint(path: str | os.PathLike | CheckpointFile | None, config: ViTConfig,
                        image_size: int | None = None, pool: str | None = None,
                        gelu_approximate: bool | None = None) -> LoadedViT:
    """Read, check and convert a ViT checkpoint (a path, `hf-hub:ORG/NAME[@REVISION][:FILE]`, or a
    resolved `CheckpointFile`; see `convert_checkpoint` for the options)."""
    file = resolve_checkpoint_file(path, config)
    loaded = convert_checkpoint(read_checkpoint(file.path), config, image_size, pool, gelu_approximate)
    return dataclasses.replace(loaded, path=file.name, sha256=file_sha256(file.path))
