"""The privacy report written next to every head; the writing of both as one unit, and their reading.

An output directory DIR holds exactly head.npz and privacy_report.json, the report carrying the head's
SHA-256. DIR is replaced as a whole (a fresh directory beside it, swapped in), one featdp writer at a time
(a lock file beside it), and `read_outputs` refuses a head and report that do not belong together.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import pathlib
import secrets
import shutil
import sys
from typing import Any

import numpy as np
from dp_accounting import dp_event as events

import featdp
from featdp import accounting, centering, integer_gaussian, mechanism
from featdp.data import Preprocessing
from featdp.training import FitResult

HEAD_FILE = "head.npz"
REPORT_FILE = "privacy_report.json"


def event_to_json(event: events.DpEvent) -> Any:
    """A DpEvent as nested JSON: {"type": class name, field: value ...} (fields named `event` hold the
    inner event, so the class name cannot live under that key)."""
    if isinstance(event, events.DpEvent):
        out = {"type": type(event).__name__}
        for field in event.__attrs_attrs__:
            out[field.name] = event_to_json(getattr(event, field.name))
        return out
    if isinstance(event, (list, tuple)):
        return [event_to_json(e) for e in event]
    return event


def privacy_report(result: FitResult, **extra) -> dict[str, Any]:
    calibration = result.calibration
    report = head_fields(result.method, result.releases, result.seeded, result.views_per_example)
    if calibration is not None:
        count, privacy, target = result.count, result.privacy, result.target
        report.update(
            target_epsilon=target.epsilon,
            epsilon=privacy.epsilon,
            delta=privacy.delta,
            target_delta=target.delta,
            accountant=calibration.accountant,
            noise_scale=calibration.noise_scale,
            dp_event=event_to_json(calibration.event),
            composition=(
                "basic composition of the released count and the method's event, plus the sampler's slack: "
                f"epsilon = {count.epsilon:.6g} (count) + {calibration.epsilon:.6g} (method, {calibration.accountant}) "
                f"+ {privacy.epsilon - privacy.accountant_epsilon:.3g} (sampler); delta = {count.delta:.6g} + "
                f"{privacy.accountant_delta - count.delta:.6g} + {privacy.delta - privacy.accountant_delta:.3g}"
            ),
            num_examples_released=count.value,
            public=_public_inputs(result),
            sampler=_sampler(result, privacy),
        )
        if result.center_noise_multiplier is not None:
            report["center"] = _centring(result)
        if result.budget_choice is not None:
            # e.g. dp-sgd recipe=auto: `hyperparameters` holds what ran, this what was asked and from what.
            report["hyperparameters_from_budget"] = result.budget_choice
    else:
        report.update(epsilon=float("inf"), delta=1.0, dp_event=event_to_json(events.NonPrivateDpEvent()),
                      warning="non-private reference method: no privacy guarantee")
    report.update(extra)
    return report


def head_fields(method, releases, seeded: bool, views_per_example: int = 1) -> dict[str, Any]:
    """What every report (`fit`'s and `tune`'s) says first: the head's method, its releases, the seeding."""
    relation = "add or remove one example (" + accounting.NEIGHBORING_RELATION.name + ")"
    if views_per_example > 1:
        relation += (f"; an example is its {views_per_example} views (rows), each statistic counting it as their "
                     "average")
    fields: dict[str, Any] = {
        "featdp_version": featdp.__version__,
        "method": method.name,
        "private": method.private,
        "hyperparameters": method.hyperparameters(),
        "neighboring_relation": relation,
        "releases": [r.to_json_dict() for r in releases],
        "noise_seeded": seeded,
    }
    if seeded:
        fields["seed_warning"] = (
            "the noise (and any random choice of the run) was drawn from a user-given seed: anyone who knows "
            "the seed can recompute and subtract it, so this head carries no privacy guarantee against them"
        )
    return fields


def _public_inputs(result: FitResult) -> dict[str, str]:
    """What the fit treated as public, and why that is sound."""
    return {
        "num_examples": "private: released as a noisy count (release 'num_examples', sensitivity 1, "
                        f"epsilon {result.count.epsilon:.4g}, delta {result.count.delta:.3g}); every use of n "
                        "(sampling rate, means, ridge floors, default delta) uses the released count",
        "classes": "public: the class set is the dataset's declared label set, not read from the private labels",
        "hyperparameters": "public: fixed before the fit, or (dp-sgd recipe=auto) chosen from the released "
                           "count, the method's epsilon and feature_dim only; selection on private data needs "
                           "`featdp tune`",
        "feature_dim": "public: the backbone's output dimension",
    }


def _centring(result: FitResult) -> dict[str, Any]:
    return {
        "share": result.method.center,
        "release": centering.RELEASE_NAME,
        "noise_multiplier": result.center_noise_multiplier,
        "sensitivity": result.method.clip_norm,
        "what": "the sum of the preprocessed train rows (an example: the average of its views), divided by the "
                "released count; every row is centred on it and preprocessed again, and head.npz's `center` "
                "holds it. Its Gaussian is part of dp_event, calibrated together with the method's",
    }


def _sampler(result: FitResult, privacy) -> dict[str, Any]:
    noisy = [r for r in result.releases if r.grid > 0]
    return {
        "name": mechanism.SAMPLER,
        "grids": sorted({r.grid for r in noisy}),
        "max_rounding_share_of_sensitivity": max((r.rounding_share for r in noisy), default=0.0),
        "pointwise_error_bound": integer_gaussian.ETA,
        "support_in_std": integer_gaussian.TRUNCATION,
        "coordinates": privacy.coordinates,
        "epsilon_slack": privacy.epsilon - privacy.accountant_epsilon,
        "delta_slack": privacy.delta - privacy.accountant_delta,
        "randomness": "AES-256-CTR keyed by " + ("SHA-256 of the user's seed" if result.seeded
                                                 else "256 bits from the OS's cryptographic source"),
    }


class OutputError(ValueError):
    """`--out` cannot be written, or a head and a report on disk do not belong together."""


class OutputInUseError(OutputError):
    """Another featdp process is writing the same output directory."""


# Names beside DIR, all in DIR's parent: `.DIR.featdp-new-*` is a staging directory (after the swap it
# holds the replaced pair until removed), `.DIR.featdp-old-*` an old pair moved aside where the file system
# cannot swap directories, `.DIR.featdp-lock` the writers' lock (removed by its holder on release).
_NEW, _OLD, _LOCK = ".featdp-new-", ".featdp-old-", ".featdp-lock"
OUTPUT_FILES = (HEAD_FILE, REPORT_FILE)


def _between_steps(step: str) -> None:
    """Called between the steps of `OutputDirectory.write` ("staged", "swapped", "moved-aside"): a no-op
    that fault-injection tests replace to raise or to kill the process at that point."""


class OutputLock:
    """An exclusive, non-blocking `flock` on `.DIR.featdp-lock` beside DIR: one featdp writer per output
    directory (other processes, and other threads of this one, get OutputInUseError at once).

    The holder unlinks the lock file before releasing it, so a finished run leaves nothing behind; a
    process that opened the file just before the unlink finds, once it holds the lock, that the path now
    names another file (or none) and tries again. A killed holder's lock is released by the kernel and its
    file reused.
    """

    def __init__(self, out_dir: str | os.PathLike, shown: str | os.PathLike | None = None):
        out_dir = pathlib.Path(out_dir)
        self.path = out_dir.parent / f".{out_dir.name}{_LOCK}"
        self._shown = shown if shown is not None else out_dir
        self._fd: int | None = None

    def __enter__(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as error:
                raise OutputError(f"cannot write {self._shown}: {_reason(error)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise OutputInUseError(
                    f"{self._shown} is in use by another featdp process"
                    + (f" (pid {holder})" if holder.isdigit() else "")
                    + f"; wait for it to finish or choose another --out (lock: {self.path})"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is not None and os.path.samestat(current, os.fstat(fd)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the previous holder removed this file after we opened it

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


def _reason(error: OSError) -> str:
    return (error.strerror or str(error)).lower() if isinstance(error, OSError) else str(error)


def check_output_dir(out_dir: str | os.PathLike) -> pathlib.Path:
    """The real path `out_dir` stands for, or an OutputError saying why featdp cannot write there.

    Writes nothing. `out_dir` must be a directory holding only featdp's outputs, or not exist, under
    directories (existing or to be created) that can be written. Its parent must be writable even if it
    exists: the new pair is staged beside it and swapped in whole.
    """
    shown = out_dir
    out = pathlib.Path(os.path.realpath(out_dir))  # a symlinked --out is written where it points
    if out.parent == out:
        raise OutputError(f"cannot write {shown}: the file system root cannot be an output directory")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputError(f"cannot write {shown}: it exists and is not a directory")
        try:
            foreign = sorted(set(os.listdir(out)) - set(OUTPUT_FILES))
        except OSError as error:
            raise OutputError(f"cannot write {shown}: {_reason(error)}") from None
        if foreign:
            listed = ", ".join(repr(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutputError(
                f"cannot write {shown}: it holds files featdp did not write ({listed}); the output directory "
                f"is replaced as a whole, so choose a new directory or one holding only {' and '.join(OUTPUT_FILES)}"
            )
    ancestor = out.parent
    while not ancestor.exists() and not ancestor.is_symlink():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {shown}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {shown}: permission denied in {ancestor}")
    return out


class OutputDirectory:
    """An output directory checked and locked for one job: ``with output_directory(out) as target: ...
    target.write(result, report)``. See `output_directory`."""

    def __init__(self, path: pathlib.Path, shown: pathlib.Path):
        self.path = path  # real path
        self.shown = shown  # as the user gave it

    def write(self, result: FitResult, report: dict[str, Any], class_names=None) -> pathlib.Path:
        """Writes head.npz and privacy_report.json as one unit: both appear at once, or neither.

        The report gains `head_sha256`, the SHA-256 of head.npz's bytes (`read_outputs` checks it). Both
        files are written and fsynced in a fresh directory beside DIR, which then replaces DIR in one
        step: swapped with it (Linux `renameat2(RENAME_EXCHANGE)`), or renamed onto it if DIR does not
        exist. Readers see the old pair or the new one, never a mix. Where the file system cannot swap
        directories, the old DIR is first renamed aside, so a kill between the two renames leaves no DIR
        and the old pair beside it, which the next run into DIR puts back before it starts.
        """
        buffer = io.BytesIO()
        preprocessing = result.method.preprocessing()
        np.savez(
            buffer,
            weights=result.weights,
            clip_norm=preprocessing.clip_norm,
            normalize=preprocessing.normalize,
            # μ̃ the rows were centred on (featdp/centering.py); empty when they were not.
            center=np.zeros(0, np.float32) if result.center is None else result.center,
            class_names=np.asarray(class_names if class_names is not None else [], dtype=str),
        )
        head = buffer.getvalue()
        report["head_sha256"] = hashlib.sha256(head).hexdigest()
        text = (json.dumps(report, indent=2, default=_json_default) + "\n").encode()
        out, parent = self.path, self.path.parent
        staging = None
        try:
            staging = _fresh_dir(parent, f".{out.name}{_NEW}")
            for name, data in ((HEAD_FILE, head), (REPORT_FILE, text)):
                _write_synced(staging / name, data)
            _fsync_dir(staging)
            _between_steps("staged")
            if not (out.is_dir() and not out.is_symlink()):
                os.rename(staging, out)
            elif _exchange(staging, out):
                _between_steps("swapped")  # staging now holds the old pair
            else:
                aside = _fresh_name(parent, f".{out.name}{_OLD}")
                os.rename(out, aside)
                try:
                    _between_steps("moved-aside")
                    os.rename(staging, out)
                except BaseException:
                    os.rename(aside, out)
                    raise
                shutil.rmtree(aside, ignore_errors=True)
            _fsync_dir(parent)
        except OSError as error:
            raise OutputError(f"cannot write {self.shown}: {_reason(error)}") from None
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return self.shown


@contextlib.contextmanager
def output_directory(out_dir: str | os.PathLike):
    """Checks that `out_dir` can be written (`check_output_dir`), creates its missing parents, takes the
    writers' lock (`OutputLock`) and tidies what a killed run left beside it; yields an OutputDirectory.

    Jobs enter this before their work, so a bad or busy --out fails at once, not after a fit. Parents
    created here are removed again (if still empty) when the block raises.
    """
    shown = pathlib.Path(out_dir)
    path = check_output_dir(out_dir)
    created = []
    try:
        missing = path.parent
        while not missing.exists():
            created.append(missing)
            missing = missing.parent
        for directory in reversed(created):
            try:
                directory.mkdir()
            except OSError as error:
                raise OutputError(f"cannot write {shown}: cannot create {directory}: {_reason(error)}") from None
        with OutputLock(path, shown):
            path = check_output_dir(out_dir)  # again, now that no other featdp writer can change it
            _recover(path)
            yield OutputDirectory(path, shown)
    except BaseException:
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _recover(out: pathlib.Path) -> None:
    """Undoes what a killed writer left beside `out` (call with the lock held): puts back an old pair
    moved aside if `out` is gone, and removes staging directories and other pairs moved aside."""
    prefix_new, prefix_old = f".{out.name}{_NEW}", f".{out.name}{_OLD}"
    leftovers = [n for n in os.listdir(out.parent) if n.startswith((prefix_new, prefix_old))]
    olds = sorted((out.parent / n for n in leftovers if n.startswith(prefix_old)), key=lambda p: p.stat().st_mtime)
    if olds and not os.path.lexists(out):
        os.rename(olds[-1], out)
    for name in leftovers:
        leftover = out.parent / name
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def write_outputs(out_dir: str | os.PathLike, result: FitResult, report: dict[str, Any],
                  class_names=None) -> pathlib.Path:
    """Writes head.npz and privacy_report.json into `out_dir` as one unit (see `OutputDirectory.write`),
    under the output lock. Jobs that should fail early on a bad --out use `output_directory` instead."""
    with output_directory(out_dir) as target:
        return target.write(result, report, class_names)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """A head and its privacy report, read together and checked to belong together."""

    path: pathlib.Path
    weights: np.ndarray
    clip_norm: float
    normalize: str
    class_names: tuple[str, ...]
    report: dict[str, Any]
    center: np.ndarray | None = None  # μ̃ the rows were centred on (featdp/centering.py), else None

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Wᵀ P(x), or Wᵀ P(P(x) − μ̃) for a centred head: the map the head was trained through."""
        return centering.head_rows(Preprocessing(self.clip_norm, self.normalize), features, self.center) @ self.weights

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class indices (into `class_names` when the file names them)."""
        return np.argmax(self.decision_function(features), axis=1)


def read_outputs(out_dir: str | os.PathLike) -> Outputs:
    """Reads DIR/head.npz and DIR/privacy_report.json from one directory and checks that the head's SHA-256
    is the report's `head_sha256`; a mismatched pair, or a report without the digest, is an OutputError.

    Both files are opened relative to one open handle on DIR, so a writer swapping DIR meanwhile cannot
    hand this reader one file of each pair (if it removes the directory first, the read starts again).
    """
    out_dir = pathlib.Path(out_dir)
    for _ in range(5):
        try:
            dir_fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise OutputError(f"{out_dir} does not exist") from None
        except OSError as error:
            raise OutputError(f"cannot read {out_dir}: {_reason(error)}") from None
        try:
            head, text = (_read_at(dir_fd, name) for name in OUTPUT_FILES)
            break
        except FileNotFoundError as error:
            if os.fstat(dir_fd).st_nlink > 0:  # not a directory swapped out and removed under us
                raise OutputError(f"{out_dir} holds no {pathlib.Path(error.filename).name}") from None
        finally:
            os.close(dir_fd)
    else:
        raise OutputError(f"{out_dir} kept changing while being read; try again")
    try:
        report = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise OutputError(f"{out_dir / REPORT_FILE} is not valid JSON: {error}") from None
    expected = report.get("head_sha256") if isinstance(report, dict) else None
    if not isinstance(expected, str):
        raise OutputError(f"{out_dir / REPORT_FILE} records no head_sha256, so it cannot be matched to "
                          f"{HEAD_FILE} (written by an older featdp, or not by featdp)")
    actual = hashlib.sha256(head).hexdigest()
    if actual != expected:
        raise OutputError(f"{out_dir / HEAD_FILE} (sha256 {actual}) is not the head its privacy report "
                          f"describes (head_sha256 {expected}): refusing a mismatched pair")
    try:
        with np.load(io.BytesIO(head), allow_pickle=False) as arrays:
            # An empty or absent `center`: the rows were not centred (heads before centring have none).
            center = arrays["center"] if "center" in arrays.files and arrays["center"].size else None
            return Outputs(out_dir, arrays["weights"], float(arrays["clip_norm"]), str(arrays["normalize"]),
                           tuple(str(c) for c in arrays["class_names"]), report, center)
    except (OSError, ValueError, KeyError) as error:
        raise OutputError(f"{out_dir / HEAD_FILE} is not a featdp head: {error}") from None


def _read_at(dir_fd: int, name: str) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError as error:
        error.filename = name
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fresh_name(parent: pathlib.Path, prefix: str) -> pathlib.Path:
    return parent / f"{prefix}{secrets.token_hex(6)}"


def _fresh_dir(parent: pathlib.Path, prefix: str) -> pathlib.Path:
    """A new directory with the usual permissions (the umask applies, unlike tempfile.mkdtemp's 0700: it
    becomes the output directory)."""
    while True:
        path = _fresh_name(parent, prefix)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swaps two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
