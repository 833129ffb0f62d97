"""The `fit` and `tune` jobs over a feature file: validate, train (or select privately) on one split, evaluate
on another, write outputs.

The output directory is checked and locked before the feature file is even opened (a bad or busy `out_dir`
fails at once, not after the fit), and stays locked until head and report are in place as one unit
(`featdp.report.output_directory`). A head and report already there are replaced, and the result says so
(`replaced`). A named test split must exist; None or "" skips the evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import time
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from featdp import distributed, report as report_lib
from featdp.checksums import file_sha256
from featdp.data import DEFAULT_BLOCK_ROWS, IN_MEMORY_BUDGET_BYTES, aligned_block_rows, views_per_example
from featdp.featurefile import FeatureFile, FeatureFileError
from featdp.report import OutputError, OutputInUseError
from featdp.training import FitResult, fit

if TYPE_CHECKING:
    from featdp.selection import SelectionResult


@dataclasses.dataclass
class FitJobResult:
    result: FitResult
    test_accuracy: float | None
    report: dict
    out_dir: pathlib.Path | None
    replaced: bool = False  # out_dir held a head and report before, which this job's replaced


def fit_feature_file(
    path: str | os.PathLike,
    method: str = "dp-fc",
    *,
    epsilon: float | None,
    delta: float | None = None,
    seed: int | None = None,
    accountant: str = "pld",
    hyperparameters: dict | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    out_dir: str | os.PathLike | None = None,
    device: str = "auto",
    processes: distributed.LocalGroup | distributed.ProcessGroup | None = None,
    block_rows: int | None = None,
    memory_budget_bytes: int = IN_MEMORY_BUDGET_BYTES,
) -> FitJobResult:
    """Fits on `train_split`, reports top-1 on `test_split` (None or "": no evaluation), writes head + report
    to `out_dir` as one unit. `device`: where the passes over the data run (`featdp.training.fit`).

    With `processes` (`featdp.distributed`), each process streams its own contiguous share of the train
    and test rows (train shares start at multiples of `block_rows`, as `fit` requires), the statistics and
    the test accuracy are summed over the processes, and process 0 alone writes `out_dir`; every process
    returns the same result and report."""
    path = pathlib.Path(path)
    group = processes if processes is not None else distributed.LOCAL
    with _locked_output(out_dir if group.is_leader else None) as target:
        replaced = _holds_outputs(target)
        with FeatureFile(path) as features:
            train = features.split(train_split)
            test = _test_split(features, test_split)
            if group.count > 1:
                # Shares start at block boundaries, and blocks hold whole examples (all of their views).
                block_rows = aligned_block_rows(block_rows or DEFAULT_BLOCK_ROWS, views_per_example(train))
                train = train.rows(*group.row_range(train.num_examples, block_rows))
            result = fit(
                train, method, epsilon=epsilon, delta=delta, seed=seed, accountant=accountant,
                hyperparameters=hyperparameters, device=device, processes=group, block_rows=block_rows,
                memory_budget_bytes=memory_budget_bytes,
            )
            accuracy = _accuracy(result, test, group) if test is not None else None
            metadata = features.metadata
        report = report_lib.privacy_report(
            result, fit_seconds=result.fit_seconds,
            **_provenance(path, metadata, train_split, test_split if test is not None else None, accuracy),
        )
        if target is not None:
            out_dir = target.write(result, report, class_names=metadata.class_names)
        elif out_dir is not None:  # another process (process 0) writes it
            out_dir = pathlib.Path(out_dir)
    return FitJobResult(result, accuracy, report, out_dir, replaced)


def _accuracy(head, test, group) -> float:
    """Top-1 of `head` on `test`: on one process directly; on several, each counts its share of the rows."""
    if group.count == 1:
        return head.accuracy(test)
    rows = test.rows(*group.row_range(test.num_examples, views_per_example(test)))
    correct = head.accuracy(rows) * rows.num_examples
    right, total = group.sum(np.array([correct, rows.num_examples], np.float64))
    return float(right / max(total, 1.0))


def _provenance(path, metadata, train_split, test_split, test_accuracy) -> dict:
    """The report fields that say which file, splits and backbone a head came from."""
    return dict(input_file=str(path), input_sha256=file_sha256(path), train_split=train_split,
                test_split=test_split, test_accuracy=test_accuracy, backbone=metadata.backbone,
                dataset=metadata.dataset)


@dataclasses.dataclass
class TuneJobResult:
    result: SelectionResult
    test_accuracy: float | None
    report: dict
    out_dir: pathlib.Path | None
    replaced: bool = False  # out_dir held a head and report before, which this job's replaced


def tune_feature_file(
    path: str | os.PathLike,
    methods: Sequence[str] = ("dp-fc",),
    *,
    epsilon: float,
    delta: float | None = None,
    mean_runs: float | None = None,
    shape: float | None = None,
    grid: dict[str, list[str]] | None = None,
    seed: int | None = None,
    accountant: str = "rdp",
    train_split: str = "train",
    test_split: str | None = "test",
    out_dir: str | os.PathLike | None = None,
    on_run: Callable[[int, int], None] | None = None,
    memory_budget_bytes: int = IN_MEMORY_BUDGET_BYTES,
) -> TuneJobResult:
    """Private selection (`featdp.selection.select`) on `train_split`, top-1 of the chosen head on
    `test_split` (None or "": no evaluation); head + privacy report written to `out_dir` as one unit."""
    from featdp import selection

    options = {k: v for k, v in (("mean_runs", mean_runs), ("shape", shape)) if v is not None}
    path = pathlib.Path(path)
    started = time.perf_counter()
    with _locked_output(out_dir) as target:
        replaced = _holds_outputs(target)
        with FeatureFile(path) as features:
            train = features.split(train_split)
            test = _test_split(features, test_split)
            result = selection.select(
                train, methods, epsilon=epsilon, delta=delta, grid=grid, seed=seed, accountant=accountant,
                on_run=on_run, memory_budget_bytes=memory_budget_bytes, **options,
            )
            accuracy = result.accuracy(test) if test is not None else None
            metadata = features.metadata
        report = selection.selection_report(
            result, tune_seconds=time.perf_counter() - started,
            **_provenance(path, metadata, train_split, test_split if test is not None else None, accuracy),
        )
        if target is not None:
            out_dir = target.write(result, report, class_names=metadata.class_names)
    return TuneJobResult(result, accuracy, report, out_dir, replaced)


def _locked_output(out_dir):
    """`report.output_directory(out_dir)`, or nothing to write when `out_dir` is None."""
    return contextlib.nullcontext() if out_dir is None else report_lib.output_directory(out_dir)


def _holds_outputs(target) -> bool:
    """Whether the locked output directory already holds a head or report (which the job will replace)."""
    return target is not None and any((target.path / name).exists() for name in report_lib.OUTPUT_FILES)


def _test_split(features: FeatureFile, name: str | None):
    """The split to evaluate on: None when `name` is None or "" (no evaluation); a name the file lacks is an
    error listing the splits it has, not a silently skipped evaluation."""
    if not name:
        return None
    if name not in features.split_names:
        raise FeatureFileError(
            f"{features.path}: no split {name!r} to test on; available splits: "
            f"{', '.join(features.split_names) or 'none'}; --test-split '' (test_split=None) fits without "
            "a test accuracy"
        )
    return features.split(name)


__all__ = ["FeatureFileError", "FitJobResult", "OutputError", "OutputInUseError", "TuneJobResult", "fit_feature_file",
           "tune_feature_file"]
