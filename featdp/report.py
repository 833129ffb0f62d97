"""The privacy report written next to every head, and the atomic writing of both."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from dp_accounting import dp_event as events

import featdp
from featdp import accounting, integer_gaussian, mechanism
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
    report: dict[str, Any] = {
        "featdp_version": featdp.__version__,
        "method": result.method.name,
        "private": result.method.private,
        "hyperparameters": result.method.hyperparameters(),
        "neighboring_relation": "add or remove one example (" + accounting.NEIGHBORING_RELATION.name + ")",
        "releases": [r.to_json_dict() for r in result.releases],
        "noise_seeded": result.seeded,
    }
    if result.seeded:
        report["seed_warning"] = (
            "the noise was drawn from a user-given seed: anyone who knows the seed can recompute and "
            "subtract it, so this head carries no privacy guarantee against them"
        )
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
    else:
        report.update(epsilon=float("inf"), delta=1.0, dp_event=event_to_json(events.NonPrivateDpEvent()),
                      warning="non-private reference method: no privacy guarantee")
    report.update(extra)
    return report


def _public_inputs(result: FitResult) -> dict[str, str]:
    """What the fit treated as public, and why that is sound."""
    return {
        "num_examples": "private: released as a noisy count (release 'num_examples', sensitivity 1, "
                        f"epsilon {result.count.epsilon:.4g}, delta {result.count.delta:.3g}); every use of n "
                        "(sampling rate, means, ridge floors, default delta) uses the released count",
        "classes": "public: the class set is the dataset's declared label set, not read from the private labels",
        "hyperparameters": "public: fixed before the fit (selection on private data needs `featdp tune`)",
        "feature_dim": "public: the backbone's output dimension",
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


def write_outputs(out_dir: str | os.PathLike, result: FitResult, report: dict[str, Any],
                  class_names=None) -> pathlib.Path:
    """Writes head.npz and privacy_report.json into `out_dir`, all or nothing.

    Both files are written into a temporary directory beside `out_dir` and moved into place only once
    complete, so an error or a kill never leaves a half-written head behind.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        preprocessing = result.method.preprocessing()
        np.savez(
            staging / HEAD_FILE,
            weights=result.weights,
            clip_norm=preprocessing.clip_norm,
            normalize=preprocessing.normalize,
            class_names=np.asarray(class_names if class_names is not None else [], dtype=str),
        )
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        out_dir.mkdir(exist_ok=True)
        for name in (HEAD_FILE, REPORT_FILE):
            os.replace(staging / name, out_dir / name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
    return out_dir


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
