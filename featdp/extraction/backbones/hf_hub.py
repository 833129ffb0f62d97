"""Checkpoints named `hf-hub:ORG/NAME[@REVISION][:FILE]`, fetched through huggingface_hub's cache.

* `ORG/NAME`: a model repository on the Hugging Face Hub, e.g. `timm/vit_base_patch16_clip_224.openai`.
* `@REVISION`: a branch, tag or full commit hash (default `main`); a commit hash pins the exact files.
* `:FILE`: the weights file in the repository; by default the first of `DEFAULT_FILES` the repository
  has (OpenCLIP's files first: a CLIP repository's `model.safetensors` is often in the transformers
  layout, which the ViT loader does not read, while timm repositories have only `model.safetensors`).

The cache is huggingface_hub's (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`),
read from the environment at each call. With `HF_HUB_OFFLINE=1` nothing is downloaded: the file must be
in the cache (`models--ORG--NAME/snapshots/<commit>/FILE`, the branch or tag resolved through
`refs/<name>`). The checkpoint is recorded as `hf-hub:ORG/NAME@<commit>:FILE` and its sha256 is that of
the file's bytes, as for a local path. Small metadata files beside the weights (`METADATA_FILES`) are
fetched too when available: CLIP reads its activation from them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from featdp.extraction.backbones.registry import BackboneError

__all__ = ["DEFAULT_FILES", "HF_PREFIX", "HubFile", "HubSpec", "download", "hub_cache_dir", "is_hub_spec",
           "parse_hub_spec"]

HF_PREFIX = "hf-hub:"
DEFAULT_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
                 "pytorch_model.bin")
METADATA_FILES = ("open_clip_config.json", "config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubCheckpointError(BackboneError):
    """An hf-hub: checkpoint that cannot be parsed or found."""


@dataclasses.dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str  # branch, tag or commit
    filename: str | None  # None: the first of DEFAULT_FILES present


@dataclasses.dataclass(frozen=True)
class HubFile:
    path: Path  # the cached file (a symlink into blobs/, or a plain file)
    repo_id: str
    revision: str  # as asked
    commit: str  # what it resolved to
    filename: str

    @property
    def name(self) -> str:
        return f"{HF_PREFIX}{self.repo_id}@{self.commit}:{self.filename}"

    def describe(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit, "filename": self.filename}


def is_hub_spec(checkpoint: object) -> bool:
    return isinstance(checkpoint, str) and checkpoint.startswith(HF_PREFIX)


def parse_hub_spec(checkpoint: str) -> HubSpec:
    body = checkpoint[len(HF_PREFIX):] if checkpoint.startswith(HF_PREFIX) else checkpoint
    repo_part, _, filename = body.partition(":")
    repo_id, at, revision = repo_part.partition("@")
    if not _REPO_ID.match(repo_id) or (at and not revision) or (":" in checkpoint[len(HF_PREFIX):] and not filename):
        raise HubCheckpointError(f"cannot parse {checkpoint!r}: expected hf-hub:ORG/NAME[@REVISION][:FILE], "
                                 "e.g. hf-hub:timm/vit_base_patch16_clip_224.openai@main")
    return HubSpec(repo_id, revision or "main", filename or None)


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, from the environment as it is now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _kind(error: BaseException) -> str:
    names = {cls.__name__ for cls in type(error).__mro__}
    for kind in ("RepositoryNotFoundError", "RevisionNotFoundError", "LocalEntryNotFoundError",
                 "EntryNotFoundError", "RemoteEntryNotFoundError"):
        if kind in names:
            return kind
    return type(error).__name__


def _commit_of(path: Path, filename: str) -> str:
    snapshot = path
    for _ in Path(filename).parts:
        snapshot = snapshot.parent
    return snapshot.name


def download(checkpoint: str, filenames: tuple[str, ...] = DEFAULT_FILES,
             metadata: tuple[str, ...] = METADATA_FILES) -> HubFile:
    """The local copy of an `hf-hub:` checkpoint (downloaded into the cache unless offline)."""
    spec = parse_hub_spec(checkpoint)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise HubCheckpointError(f"{checkpoint} needs huggingface_hub: pip install huggingface_hub") from error
    cache, offline = hub_cache_dir(), _offline()

    def fetch(filename: str) -> Path:
        return Path(hf_hub_download(spec.repo_id, filename, revision=spec.revision, cache_dir=str(cache),
                                    local_files_only=offline))

    candidates = (spec.filename,) if spec.filename else filenames
    misses = []
    for filename in candidates:
        try:
            path = fetch(filename)
        except Exception as error:  # noqa: BLE001 (huggingface_hub's errors differ between its versions)
            kind = _kind(error)
            if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
                raise HubCheckpointError(f"{checkpoint}: {kind}: {error}") from error
            misses.append(f"{filename}: {kind}")
            continue
        for extra in metadata:  # best effort: absent from most repositories
            if extra != filename:
                try:
                    fetch(extra)
                except Exception:  # noqa: BLE001
                    pass
        return HubFile(path, spec.repo_id, spec.revision, _commit_of(path, filename), filename)
    where = f"the cache {cache}" + (" (HF_HUB_OFFLINE is set: nothing is downloaded)" if offline else "")
    raise HubCheckpointError(
        f"{checkpoint}: no weights file at revision {spec.revision!r} of {spec.repo_id} in {where}; tried "
        + "; ".join(misses) + ". Name the file with hf-hub:ORG/NAME[@REVISION]:FILE, or download it first "
        f"(huggingface-cli download {spec.repo_id} FILE --revision {spec.revision})")
