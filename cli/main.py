"""The `featdp` command: a thin typer layer over the library. Parse, call, print; no math here."""

from __future__ import annotations

import contextlib
import enum
import json
import math
import pathlib
import sys
import time
import warnings
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from featdp import __version__
from featdp.progress import Update
from featdp_cli.display import ProgressDisplay

try:  # typer ≥ 0.26 carries its own copy of click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer, on the click package
    from click.exceptions import UsageError


class _Commands(TyperGroup):
    """A usage error in a command's arguments (a value outside the listed choices, a missing or unknown
    option) follows the CLI's rule for bad input: one `error:` line naming the value, exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as error:
            where = error.ctx.command_path if error.ctx is not None else "featdp"
            _fail(f"{error.format_message()} (`{where} --help` lists the options)")

    # Whether the arguments are this process's own command line (not a caller's list, as CliRunner passes):
    # only then may `_process_group` supervise a run by starting that command line again.
    own_command_line = False

    def main(self, args=None, *more, **options):
        _Commands.own_command_line = args is None
        return super().main(args, *more, **options)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would eat bracketed text such as `NAME[@REVISION]`, and rich's help
    # writes `<bool>` after every flag.
    rich_markup_mode=None,
    help="Differentially private linear heads on frozen pretrained features.",
)
console = Console()
errors = Console(stderr=True)
# User-derived text (paths, split and attribute values, messages quoting them) is printed as rich `Text`
# or through `escape`, never as markup: `[bold]` or `[nan]` in a value would vanish and `[/x]` would crash.
# Lines a user may paste back (commands, paths) are printed with soft_wrap: never broken by rich (a terminal
# folds them, and copying gives one line); off a terminal tables are not wrapped either (`_version`).
UNWRAPPED_WIDTH = 10_000


def _say(text: str | Text) -> None:
    """Prints one line of plain text (no markup, no highlighting), never wrapped by rich."""
    console.print(text if isinstance(text, Text) else Text(text), highlight=False, soft_wrap=True)


# Choices, spelled out here so that `featdp --help` need not import the library (the accountants alone take
# a second); tests/test_cli.py checks them against the library's own lists.
def _choices(name: str, values: tuple[str, ...]) -> type[enum.Enum]:
    return enum.Enum(name, [(v, v) for v in values], type=str)


Accountant = _choices("Accountant", ("pld", "rdp"))  # featdp.accounting.ACCOUNTANTS
Device = _choices("Device", ("auto", "cpu", "gpu", "tpu", "cpu-jax"))  # featdp.backend.DEVICES
AuditMode = _choices("AuditMode", ("canary", "one-run", "white-box"))
AuditScore = _choices("AuditScore", ("releases", "head"))  # featdp.audit.canary.SCORES
ComputeDtype = _choices("ComputeDtype", ("auto", "float32", "bfloat16"))  # featdp.extraction.extract.DTYPES


def _user_errors() -> tuple[type[Exception], ...]:
    from featdp.accounting import PrivacyParameterError
    from featdp.data import DataError
    from featdp.featurefile import FeatureFileError
    from featdp.methods import HyperparameterError
    from featdp.backend import DeviceError
    from featdp.distributed import DistributedError
    from featdp.report import OutputError

    return (PrivacyParameterError, DataError, FeatureFileError, HyperparameterError, OutputError, DeviceError,
            DistributedError)


def _extraction_errors() -> tuple[type[Exception], ...]:
    from featdp.extraction.backbones.registry import BackboneError
    from featdp.extraction.datasets import DatasetError
    from featdp.extraction.extract import ExtractError
    from featdp.featurefile import FeatureFileError

    # Checkpoint readers raise their own ValueError subclasses and FileNotFoundError for missing files;
    # a directory given as a checkpoint is IsADirectoryError.
    return (BackboneError, DatasetError, ExtractError, FeatureFileError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, ValueError)


MEMORY_GIB = typer.Option(1.0, "--memory-gib", help="Hold the train split in memory (as float32) when it fits this many GiB; a larger one is read from the file on every pass.")


def _memory_budget(gib: float) -> int:
    """--memory-gib in bytes; exits with an error line unless it is a finite number ≥ 0."""
    if not (math.isfinite(gib) and gib >= 0):
        _fail(f"--memory-gib must be a finite number ≥ 0, got {gib:g}")
    return int(gib * 2**30)


def _fail(message: str) -> None:
    errors.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _warn(message) -> None:
    errors.print(Text.assemble(("warning:", "yellow"), " ", str(message)), highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _warnings_printed(ignore: tuple[type[Warning], ...] = ()):
    """Collects a job's warnings and prints them as `warning:` lines when it ends, also when it fails (a
    warning that preceded the error is part of the story)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                if not issubclass(warning.category, ignore):
                    _warn(warning.message)


def _parse_sets(pairs: List[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


TEST_SPLIT_HELP = "Split to report top-1 on; it must exist. --test-split '' fits without a test accuracy."

# The process-group options of `fit` and `extract` (featdp.distributed); without them JAX's cluster detection
# (Slurm, Open MPI, Cloud TPU pods) decides, and outside a cluster the command runs as one process.
COORDINATOR = typer.Option(None, "--coordinator", metavar="HOST:PORT", help="Process 0's address, the same for "
                           "every process of a multi-host run (process 0 listens on PORT).")
NUM_PROCESSES = typer.Option(None, "--num-processes", help="Processes (hosts) in the run; 1: this process alone.")
PROCESS_ID = typer.Option(None, "--process-id", help="This process's index in [0, --num-processes).")
COORDINATOR_TIMEOUT = typer.Option(300.0, "--coordinator-timeout", help="Seconds to wait for every process "
                                   "to join before stopping with an error.")


@contextlib.contextmanager
def _process_group(coordinator, num_processes, process_id, timeout, job: dict):
    """The process group of a multi-host run (`featdp.distributed.connect`), as a context: a failure on any
    process ends the command on every process, each naming it. The process a user started runs the job in
    a child and supervises it (`featdp_cli.supervise`): a dead process 0 is one `error:` line there too."""
    from featdp import distributed
    from featdp_cli import supervise

    if supervise.is_child():
        supervise.adopt()
    elif _Commands.own_command_line and supervise.available() and (command := supervise.command_line()):
        spec = distributed.resolve(coordinator, num_processes, process_id)
        if spec is not None:  # this process supervises the job, run by a child (featdp_cli.supervise)
            console.quiet = True  # the child shows the progress: this process's (empty) display must not erase it
            try:
                outcome = supervise.run(command, coordinator=spec.coordinator, process_id=spec.process_id,
                                        num_processes=spec.num_processes)
            finally:
                console.quiet = False
            if outcome.message is not None:
                raise distributed.DistributedError(outcome.message)
            if outcome.returncode < 0:
                console.show_cursor(True)
            raise typer.Exit(code=supervise.exit_like(outcome.returncode))
    with distributed.connect(coordinator, num_processes, process_id, job=job, timeout=timeout) as group:
        yield group
TRAIN_SPLIT_HELP = "Split of the feature file to train on (private data)."
FEATURES_HELP = "Feature file (HDF5), as `featdp extract` writes it."
DELTA_HELP = "Target delta; default: a power of ten ≤ 0.1/ñ (ñ: the released count)."


@app.command()
def fit(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help=FEATURES_HELP),
    method: str = typer.Option("dp-fc", "--method", "-m", help="Method name; see `featdp methods`."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Target epsilon (required for private methods)."),
    delta: Optional[float] = typer.Option(None, "--delta", help=DELTA_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the noise (any integer, hashed whole; reproducible, but predictable)."),
    accountant: Accountant = typer.Option("pld", "--accountant", help="pld (default, exact for Gaussians) or rdp."),
    sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Hyperparameter KEY=VALUE; repeatable (see `featdp methods`)."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Output directory for head + report; default: heads/<method>_eps<ε> (heads/<method> without --eps). A previous head and report there are replaced."),
    train_split: str = typer.Option("train", "--train-split", help=TRAIN_SPLIT_HELP),
    test_split: str = typer.Option("test", "--test-split", help=TEST_SPLIT_HELP),
    device: Device = typer.Option("auto", "--device", help="Where the passes over the data run: auto (an "
                                  "accelerator if JAX has one, else numpy on the CPU), cpu, gpu, tpu or cpu-jax. "
                                  "Noise is always drawn on the host."),
    coordinator: Optional[str] = COORDINATOR,
    num_processes: Optional[int] = NUM_PROCESSES,
    process_id: Optional[int] = PROCESS_ID,
    coordinator_timeout: float = COORDINATOR_TIMEOUT,
    memory_gib: float = MEMORY_GIB,
):
    """Train a private linear head on the train split and report test accuracy."""
    from featdp.jobs import fit_feature_file
    from featdp.methods import get_method

    memory_budget = _memory_budget(memory_gib)  # before joining any process group
    overrides = _parse_sets(sets)
    try:
        method_obj = get_method(method)
        method_obj = type(method_obj).from_strings(overrides)
        if out is None:
            out = pathlib.Path("heads") / (f"{method}_eps{eps:g}" if eps is not None else method)
        command = dict(command="fit", features=str(features), method=method, eps=eps, delta=delta, seed=seed,
                       accountant=accountant.value, sets=sorted(overrides.items()), out=str(out),
                       train_split=train_split, test_split=test_split)
        with _warnings_printed(), ProgressDisplay(console, last_lines=False), _process_group(
                coordinator, num_processes, process_id, coordinator_timeout, command) as group:
            job = fit_feature_file(
                features, method_obj, epsilon=eps, delta=delta, seed=seed, accountant=accountant.value,
                train_split=train_split, test_split=test_split, out_dir=out, device=device.value, processes=group,
                memory_budget_bytes=memory_budget,
            )
    except _user_errors() as error:
        _fail(str(error))
    _print_summary(job)


def _print_summary(job) -> None:
    report = job.report
    table = Table(show_header=False, box=None)
    table.add_row("method", report["method"])
    # Exactly what ran where it differs from the defaults (a recipe's choice included), pasteable as --set.
    changed = job.result.method.changed_hyperparameters()
    if changed:
        table.add_row("hyperparameters", ", ".join(
            f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}" for key, value in changed.items()))
    if report["private"]:
        _add_privacy_rows(table, report)
        table.add_row("sampler", f"{report['sampler']['name']}; ε slack {report['sampler']['epsilon_slack']:.1e}")
    else:
        table.add_row("privacy", "[red]none: non-private reference[/]")
    _add_outcome_rows(table, job, "fit time", report["fit_seconds"])
    console.print(table)


def _add_privacy_rows(table, report) -> None:
    table.add_row("epsilon", f"{report['epsilon']:.4f} (target {report['target_epsilon']:g})")
    table.add_row("delta", f"{report['delta']:g}")
    table.add_row("accountant", report["accountant"])
    table.add_row("train examples", f"≈ {report['num_examples_released']} (released noisy count)")


def _add_outcome_rows(table, job, time_label: str, seconds: float) -> None:
    if job.test_accuracy is not None:
        table.add_row("test top-1", f"{job.test_accuracy:.4f}")
    table.add_row(time_label, f"{seconds:.2f} s")
    if job.report["noise_seeded"]:
        table.add_row("noise", "[yellow]seeded: predictable to anyone who knows the seed[/]")
    table.add_row("written", Text(str(job.out_dir)))
    if job.replaced:
        table.add_row("replaced", Text(f"the previous head and report in {job.out_dir}", style="yellow"))


@app.command()
def tune(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help=FEATURES_HELP),
    methods: List[str] = typer.Option(["dp-fc"], "--method", "-m", help="A private method to tune; repeatable."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Target epsilon of the whole selection (required)."),
    delta: Optional[float] = typer.Option(None, "--delta", help=DELTA_HELP),
    grids: List[str] = typer.Option([], "--grid", metavar="KEY=V1,V2", help="KEY=V1,V2: candidates are the product over all --grid keys, for every --method; default: each method's tuning grid."),
    mean_runs: float = typer.Option(10.0, "--mean-runs", help="Mean number of runs R (the number is random: it is what makes the selection cheap)."),
    shape: float = typer.Option(1.0, "--shape", help="Shape of the law of the number of runs: 1 geometric (default), 0 logarithmic, else truncated negative binomial."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the noise and the draws (reproducible, but predictable)."),
    accountant: Accountant = typer.Option("rdp", "--accountant", help="rdp (the only accountant with the Papernot–Steinke bound)."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Output directory for head + report; default: heads/tune_eps<ε>. A previous head and report there are replaced."),
    train_split: str = typer.Option("train", "--train-split", help=TRAIN_SPLIT_HELP),
    test_split: str = typer.Option("test", "--test-split", help=TEST_SPLIT_HELP),
    memory_gib: float = MEMORY_GIB,
):
    """Choose a method and hyperparameters privately (random stopping, Papernot & Steinke 2022) and write the chosen head."""
    from featdp.jobs import tune_feature_file
    from featdp.selection import RunsDistribution, SelectionError, build_candidates, parse_grid

    if eps is None:
        _fail("--eps is required: the selection is private, and its target epsilon covers every run")
    memory_budget = _memory_budget(memory_gib)
    try:
        grid = parse_grid(grids)
        RunsDistribution(mean_runs, shape)
        build_candidates(methods, grid, 1000.0)  # unknown or non-private methods, bad grid keys and values
        if out is None:
            out = pathlib.Path("heads") / f"tune_eps{eps:g}"
        # RuntimeWarnings are numpy's, from the accountants' searches. The number of runs is not covered by
        # the privacy guarantee: the operator may watch it on a terminal, but it is kept out of logs and
        # reports, so off a terminal nothing is shown (lines=False), not even the runs' own fits.
        with _warnings_printed(ignore=(RuntimeWarning,)), ProgressDisplay(console, lines=False) as display:
            job = tune_feature_file(
                features, methods, epsilon=eps, delta=delta, mean_runs=mean_runs, shape=shape, grid=grid,
                seed=seed, accountant=accountant.value, train_split=train_split, test_split=test_split,
                out_dir=out, on_run=lambda done, total: display(Update("runs", done, total)),
                memory_budget_bytes=memory_budget,
            )
    except (SelectionError, *_user_errors()) as error:
        _fail(str(error))
    _print_tune_summary(job)


def _print_tune_summary(job) -> None:
    report = job.report
    selection = report["selection"]
    table = Table(show_header=False, box=None)
    table.add_row("chosen", Text(f"{report['method']} "
                                 + " ".join(f"{k}={v}" for k, v in report["hyperparameters"].items())))
    table.add_row("noisy validation top-1", f"{report['validation']['noisy_accuracy']:.4f} "
                                            f"(≈ {report['validation']['public_size']:.0f} examples, noise std "
                                            f"{report['validation']['noise_std']:.3g})")
    table.add_row("candidates", str(len(selection["candidates"])))
    table.add_row("runs", f"random, {selection['distribution']} (the number drawn is not reported)")
    _add_privacy_rows(table, report)
    _add_outcome_rows(table, job, "time", report["tune_seconds"])
    console.print(table)


@app.command()
def info(features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help=FEATURES_HELP)):
    """Print a feature file's metadata and splits (an unfinished split: rows written of the rows declared; a
    split of augmented views: its examples, views per example and rows)."""
    from featdp.featurefile import FeatureFile

    try:
        with FeatureFile(features) as handle:
            meta = handle.metadata.to_json_dict()
            table = Table(title=Text(str(features)), show_header=False)
            for key, value in meta.items():
                text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
                table.add_row(Text(key), Text(text if len(text) < 200 else text[:197] + "..."))
            console.print(table)
            _print_combined_sources(handle.metadata.preprocessing)
            opened = [handle.split(name, require_complete=False) for name in handle.split_names]
            # A views column only where a split holds augmented views: a one-view file prints as it always did.
            with_views = any(split.views_per_example > 1 for split in opened)
            splits = Table("split", "examples", *(["views"] if with_views else []), "dim", "dtype", "state")
            for split in opened:
                views = split.views_per_example
                if split.complete:
                    examples, state = str(split.declared_examples // views), "complete"
                else:
                    examples = f"{split.rows_done // views} of {split.declared_examples // views}"
                    state = Text("unfinished: re-run the extraction to finish it", style="yellow")
                if views > 1:
                    done = "" if split.complete else f"{split.rows_done} of "
                    examples += f" ({done}{split.declared_examples} rows)"
                splits.add_row(Text(split.name), examples, *([str(views)] if with_views else []),
                               str(split.feature_dim), Text(str(split.dtype)), state)
            console.print(splits)
    except _user_errors() as error:
        _fail(str(error))


def _print_combined_sources(preprocessing: dict) -> None:
    """A combined file's sources (`featdp combine`), one row each, when its metadata lists them."""
    sources = preprocessing.get("combined") if isinstance(preprocessing, dict) else None
    if not isinstance(sources, list) or not all(isinstance(source, dict) for source in sources):
        return
    table = Table("combined from", "backbone", "dim", "share", title=Text("sources (featdp combine)"))
    for source in sources:
        weight = source.get("weight")
        table.add_row(*(Text(str(source.get(key, ""))) for key in ("file", "backbone", "feature_dim")),
                      f"{weight:.4g}" if isinstance(weight, (int, float)) else Text(str(weight)))
    console.print(table)


@app.command()
def methods():
    """List the registered methods and their hyperparameters (set with --set KEY=VALUE)."""
    import dataclasses

    from featdp.methods import registry

    table = Table("method", "hyperparameter", "default", "meaning")
    for name, cls in sorted(registry().items()):
        label = Text(name) if cls.private else Text.assemble(name, ("\n(non-private)", "red"))
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for index, (key, meaning) in enumerate(cls.hyperparameter_help().items()):
            table.add_row(label if index == 0 else "", key, str(defaults[key]), meaning,
                          end_section=index == len(defaults) - 1)
    console.print(table)


@app.command()
def audit(
    method: str = typer.Option(..., "--method", "-m", help="Method name; see `featdp methods`."),
    eps: float = typer.Option(..., "--eps", help="The claimed epsilon."),
    delta: float = typer.Option(1e-5, "--delta", help="The claimed delta."),
    trials: int = typer.Option(2000, "--trials", help="Fits (canary, white-box) or canaries in one fit (one-run)."),
    mode: AuditMode = typer.Option("canary", "--mode", help="canary (M fits, half with a canary), one-run (M canaries in one fit) or white-box (each release's noise against its declared σ)."),
    score: AuditScore = typer.Option("releases", "--score", help="releases (likelihood ratio of the released statistics) or head (the canary's logit margin: black-box)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the empirical lower bound."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the audit's noise and canaries."),
    accountant: Accountant = typer.Option("pld", "--accountant", help="Accountant that calibrates the claim."),
    sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Hyperparameter KEY=VALUE; repeatable (see `featdp methods`)."),
):
    """Empirical privacy audit: a lower bound on ε from canaries; exit 1 if it exceeds the claim."""
    from featdp.methods import get_method

    overrides = _parse_sets(sets)
    try:
        method_obj = type(get_method(method)).from_strings(overrides)
        with ProgressDisplay(console):
            if mode.value == "white-box":
                result = _run_white_box(method_obj, eps, delta, trials, seed, accountant.value)
            else:
                result = _run_canary_audit(method_obj, eps, delta, trials, mode.value, score.value, confidence, seed,
                                           accountant.value)
    except _user_errors() as error:
        _fail(str(error))
    if getattr(method_obj, "recipe", None) == "auto":  # `featdp.audit.design.at_budget` leaves its centring out
        console.print("note: recipe=auto's centring (its released mean, featdp/centering.py) is not audited: "
                      "the audit examines the recipe's own steps")
    (_print_white_box if mode.value == "white-box" else _print_audit)(result)


def _run_canary_audit(method, eps, delta, trials, mode, score, confidence, seed, accountant):
    from featdp.audit import canary_audit, one_run_audit

    run = canary_audit if mode == "canary" else one_run_audit
    count = {"trials": trials} if mode == "canary" else {"canaries": trials}
    return run(method, eps, delta, seed=seed, confidence=confidence, score=score, accountant=accountant, **count)


def _run_white_box(method, eps, delta, trials, seed, accountant):
    from featdp.audit import white_box_audit

    return white_box_audit(method, eps, delta, trials=trials, seed=seed, accountant=accountant)


def _print_audit(result) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("method", result.method)
    table.add_row("audit", f"{result.mode}, {result.trials} {'fits' if result.mode == 'canary' else 'canaries'}, "
                           f"score: {result.score}")
    table.add_row("claimed", f"epsilon {result.claimed_epsilon:g} at delta {result.delta:g}")
    table.add_row("empirical lower bound", f"epsilon >= {result.empirical_epsilon:.3f} "
                                           f"(confidence {result.confidence:g})")
    if result.sensitivity_ratio is not None:
        table.add_row("canary / declared sensitivity", f"{result.sensitivity_ratio:.4f} (must be <= 1)")
    if result.post_processing is not None:
        table.add_row("head from releases alone", "yes" if result.post_processing else "[red]no[/]")
    table.add_row("time", f"{result.seconds:.1f} s")
    verdict = "[green]consistent with the claim (a lower bound is no proof)[/]" if result.passed else (
        "[bold red]VIOLATION: the claim is false[/]")
    table.add_row("verdict", verdict)
    console.print(table)
    if not result.passed:
        raise typer.Exit(code=1)


def _print_white_box(result) -> None:
    table = Table("check", "release", "p-value", "detail", "ok",
                  title=f"white-box audit of {result.method} at epsilon {result.claimed_epsilon:g}, "
                        f"delta {result.delta:g}: {result.trials} fits, {result.seconds:.1f} s")
    for check in result.checks:
        table.add_row(check.kind, check.release, f"{check.p_value:.3g}", check.detail,
                      "yes" if check.passed else "[bold red]NO[/]")
    console.print(table)
    if not result.passed:
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: pathlib.Path = typer.Option(pathlib.Path("runs/demo"), "--out", help="Directory for the feature file and every head and privacy report."),
    backbone: str = typer.Option("scatternet", "--backbone", "-b", help="See `featdp backbones`; several joined "
                                 "by '+' (e.g. scatternet+efficientnet-lite0) are each extracted, then combined."),
    eps: str = typer.Option("1,3", "--eps", help="Comma-separated epsilons."),
    delta: float = typer.Option(1e-5, "--delta", help="Delta of every private fit."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N images per split (a file of its own)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the Fashion-MNIST IDX files; default: where Debian's dataset-fashion-mnist installs them."),
):
    """The main job, offline: Fashion-MNIST → frozen backbone → every method at a few ε → one table."""
    from featdp.demo import Demo

    try:
        epsilons = tuple(float(e) for e in eps.split(","))
    except ValueError:
        _fail(f"--eps expects comma-separated numbers, got {eps!r}")
    try:
        job = Demo(out=out, backbone=backbone, epsilons=epsilons, delta=delta, limit=limit, data_dir=data_dir)
    except (*_user_errors(), *_extraction_errors()) as error:
        _fail(str(error))
    size = f"(first {limit} images per split) " if limit else ""
    started = time.perf_counter()
    for name in job.backbones:
        console.print(f"[bold]1/2[/] extracting Fashion-MNIST {size}with {escape(name)} into "
                      f"{escape(str(job.backbone_file(name)))} (resumable; reused when complete)", highlight=False,
                      soft_wrap=True)
        extracting = time.perf_counter()
        try:
            with ProgressDisplay(console) as display:
                extraction = _ExtractionProgress(display)  # one per file: each has its own train and test
                job.extract_backbone(name, on_progress=extraction)
        except _extraction_errors() as error:
            _fail(str(error))
        reused = " (already complete: reused)" if extraction.already_complete else ""
        _say(f"    extraction: {time.perf_counter() - extracting:.0f} s{reused}")
    if len(job.backbones) > 1:
        try:
            job.combine()
        except _user_errors() as error:
            _fail(str(error))
        _say(f"    combined into {job.features} (each backbone's part of a row at an equal share of its norm)")
    console.print(f"[bold]2/2[/] fitting every method at ε ∈ {{{', '.join(f'{e:g}' for e in job.epsilons)}}}, "
                  f"δ = {delta:g} (noise from the OS); each row as it finishes:", highlight=False, soft_wrap=True)
    table = Table("method", *[f"ε={e:g}" for e in job.epsilons], "fit s (each)",
                  title=Text(f"Fashion-MNIST test top-1, {backbone} features"))
    try:
        with ProgressDisplay(console):
            for row in job.rows():
                accuracies = row.accuracies if row.private else row.accuracies * len(job.epsilons)
                seconds = "/".join(f"{s:.0f}" for s in row.fit_seconds)
                table.add_row(Text(row.label), *[f"{a:.4f}" for a in accuracies], seconds)
                cells = "  ".join(f"ε={e:g}: {a:.4f}" for e, a in zip(job.epsilons, accuracies)) if row.private \
                    else f"{row.accuracies[0]:.4f} (no ε: non-private)"
                _say(f"    {row.label:<30} {cells}   fit {seconds} s")
    except _user_errors() as error:
        _fail(str(error))
    console.print(table)
    _say(f"dp-sgd's default is one full-batch step (a noisy class-mean classifier); recipe=auto is "
         f"`featdp fit --method dp-sgd --set recipe=auto` (its epochs follow ñ·ε; rows centred on a released mean); "
         f"the Tramèr–Boneh row is "
         f"`{job.recipe_command()}` ({job.recipe['steps']} Poisson-sampled steps).")
    if job.published:
        _say(f"published: {job.published}")
    _say(f"total {time.perf_counter() - started:.0f} s; heads and privacy reports under {out}/")


@app.command()
def bench(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help=FEATURES_HELP),
    eps: str = typer.Option("0.1,0.5,1,2,3,4,8", "--eps", help="Comma-separated epsilons."),
    delta: float = typer.Option(1e-5, "--delta", help="Delta of every private fit."),
    seeds: int = typer.Option(5, "--seeds", help="Fits per (method, ε); seeds 0…N−1."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated; default: every method. The non-private references run either way (see --no-references)."),
    references: bool = typer.Option(True, "--references/--no-references", help="Also run the non-private references (ridge, logreg) when --methods does not name them."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Also report oracle rows: hyperparameters chosen on held-out train data, NOT private."),
    private_tune: bool = typer.Option(True, "--private-tune/--no-private-tune", help="Also report private-tuned rows: hyperparameters chosen by `featdp tune`'s random stopping within the same ε."),
    auto: bool = typer.Option(True, "--auto/--no-auto", help="Also report recipe=auto rows for methods that have it (dp-sgd): hyperparameters chosen from the released count and ε only, private end to end."),
    mean_runs: Optional[float] = typer.Option(None, "--mean-runs", help="Mean number of runs R of the private selection; default: each method's grid size."),
    peers: str = typer.Option("", "--peers", help="Comma-separated peers: opacus-dpsgd, diffprivlib-logreg, sklearn-logreg."),
    peer_eps: Optional[str] = typer.Option(None, "--peer-eps", help="ε for the private peers; default: --eps."),
    peer_seeds: Optional[int] = typer.Option(None, "--peer-seeds", help="Seeds for the peers; default: --seeds."),
    out: pathlib.Path = typer.Option(pathlib.Path("bench"), "--out", help="Directory for .md/.csv/.json/.png."),
    name: Optional[str] = typer.Option(None, "--name", help="File stem; default: the feature file's stem."),
    train_split: str = typer.Option("train", "--train-split", help=TRAIN_SPLIT_HELP),
    test_split: str = typer.Option("test", "--test-split", help="Split to report top-1 on."),
    accountant: Accountant = typer.Option("pld", "--accountant", help="Accountant of the default and oracle rows (private-tuned rows: rdp)."),
    memory_gib: float = typer.Option(1.0, "--memory-gib", help="Hold the splits in memory (as float32) while they fit this many GiB; larger splits are read from the file on every pass, and peers are skipped."),
):
    """Every method × ε × seed on one feature file (plus private-tuned, oracle, non-private and peer rows): tables and a plot."""
    from featdp.bench import report as bench_report
    from featdp.bench.runner import BenchConfig, BenchError, load_splits, run_bench

    command = " ".join(
        [f"featdp bench {features} --eps {eps} --delta {delta:g} --seeds {seeds}"]
        + ([f"--methods {methods}"] if methods else []) + ([] if references else ["--no-references"])
        + ([] if tune else ["--no-tune"])
        + ([] if private_tune else ["--no-private-tune"]) + ([] if auto else ["--no-auto"])
        + ([f"--mean-runs {mean_runs:g}"] if mean_runs is not None else [])
        + ([f"--peers {peers}"] if peers else []) + ([f"--peer-eps {peer_eps}"] if peer_eps else [])
        + ([f"--peer-seeds {peer_seeds}"] if peer_seeds else [])
        + ([f"--accountant {accountant.value}"] if accountant.value != "pld" else [])
        + ([f"--memory-gib {memory_gib:g}"] if memory_gib != 1.0 else [])
    )
    budget = _memory_budget(memory_gib)
    try:
        epsilons = tuple(float(e) for e in eps.split(","))
        peer_epsilons = tuple(float(e) for e in peer_eps.split(",")) if peer_eps else None
    except ValueError:
        _fail(f"--eps and --peer-eps expect comma-separated numbers, got {eps!r} / {peer_eps!r}")
    try:
        config = BenchConfig(
            epsilons=epsilons, delta=delta, seeds=seeds, tune=tune, private_tune=private_tune, auto=auto,
            mean_runs=mean_runs,
            accountant=accountant.value, methods=tuple(methods.split(",")) if methods else None,
            references=references, peers=tuple(p for p in peers.split(",") if p), peer_epsilons=peer_epsilons,
            peer_seeds=peer_seeds,
        )
        train, test = load_splits(features, train_split, test_split, budget_bytes=budget)

        def show(row):
            budget = "non-private" if row.epsilon is None else f"ε={row.epsilon:g} seed {row.seed}"
            spent = f"  (reported ε {row.epsilon_spent:.4f})" if row.kind == "private-tuned" else ""
            _say(f"  {row.kind:<13} {row.method:<20} {budget:<18} {100 * row.accuracy:5.1f}%  "
                 f"{row.fit_seconds:7.2f} s{spent}")

        with ProgressDisplay(console):
            result = run_bench(train, test, config, on_row=show)
    except (BenchError, *_user_errors()) as error:
        _fail(str(error))
    stem = name or features.stem
    paths = bench_report.write_all(result, out, stem, f"featdp bench: {features.name}", command)
    console.print(bench_report.markdown(result, f"featdp bench: {features.name}", command), highlight=False,
                  soft_wrap=True, markup=False)
    _say("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def extract(
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", "-b", help="See `featdp backbones`."),
    dataset: str = typer.Option("fashion_mnist", "--dataset", "-d",
                                help="fashion_mnist, tfds:NAME, folder:PATH (PATH/<split>/<class>/<image>) or "
                                     "hf:PATH_OR_NAME[@REVISION][:CONFIG] (Hugging Face datasets; --data-dir: its cache)."),
    out: pathlib.Path = typer.Option(pathlib.Path("features.h5"), "--out", "-o", help="The feature file to write, or to finish (resumable)."),
    splits: Optional[str] = typer.Option(None, "--splits", help="Comma-separated; default: all splits."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="TFDS data_dir or the Fashion-MNIST folder."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Weights for the backbone: a file, or hf-hub:ORG/NAME[@REVISION][:FILE] (Hugging Face cache; "
                                                     "HF_HUB_OFFLINE=1: cache only)."),
    checkpoint_sha256: Optional[str] = typer.Option(
        None, "--checkpoint-sha256", help="Expected SHA-256 of the weights; a different file is an error."
    ),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Default: 256 on GPU/TPU, 32 on the CPU."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N examples per split (quick runs)."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace a file made by a different command (or from a changed source) instead of refusing."),
    dtype: ComputeDtype = typer.Option("auto", "--dtype", help="Compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32 or bfloat16."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Loader processes decoding and resizing images (default: min(16, CPU count)); 0 or 1 loads in this process."
    ),
    views: int = typer.Option(1, "--views", help="Views per training example; 1 = no augmentation. N > 1 writes "
                              "N rows per example of the train split: the image and N-1 random flips and shifts."),
    augment_seed: int = typer.Option(0, "--augment-seed", help="Seed of the --views augmentations (public, "
                                     "recorded in the file)."),
    augment_shift: Optional[int] = typer.Option(None, "--augment-shift", help="Largest shift, in pixels per axis, of "
                                                "an augmented view; default: an eighth of the backbone's image size."),
    augment_flip: bool = typer.Option(True, "--augment-flip/--no-augment-flip", help="Whether augmented views "
                                      "may be flipped left-right."),
    coordinator: Optional[str] = COORDINATOR,
    num_processes: Optional[int] = NUM_PROCESSES,
    process_id: Optional[int] = PROCESS_ID,
    coordinator_timeout: float = COORDINATOR_TIMEOUT,
):
    """Extract features of a frozen backbone into a feature file (resumable: re-run the same command).
    With several processes, each writes its share to <out>.parts/ and process 0 writes <out>."""
    from featdp.extraction.extract import ExtractConfig, extract as run_extract

    if workers is not None and workers < 0:
        # extract.py starts loader processes only for workers > 1: 0 and 1 both load in this process.
        _fail(f"--workers must be ≥ 0 (0 or 1: load in this process), got {workers}")
    config = ExtractConfig(
        backbone=backbone, dataset=dataset, out=out, splits=tuple(splits.split(",")) if splits else None,
        data_dir=data_dir, checkpoint=checkpoint, checkpoint_sha256=checkpoint_sha256, batch_size=batch_size,
        limit=limit, overwrite=overwrite, dtype=dtype.value, views=views, augment_seed=augment_seed,
        augment_shift=augment_shift, augment_flip=augment_flip, **({} if workers is None else {"workers": workers}),
    )
    try:
        command = dict(command="extract", backbone=backbone, dataset=dataset, out=str(out), splits=splits,
                       checkpoint=checkpoint, checkpoint_sha256=checkpoint_sha256, limit=limit, overwrite=overwrite,
                       dtype=dtype.value, views=views, augment_seed=augment_seed, augment_shift=augment_shift,
                       augment_flip=augment_flip)
        with ProgressDisplay(console) as display, _process_group(
                coordinator, num_processes, process_id, coordinator_timeout, command) as group:
            extraction = _ExtractionProgress(display)
            path = run_extract(config, on_progress=extraction, processes=group)
    except _extraction_errors() as error:
        _fail(str(error))
    _say(f"already complete: {path} (nothing to extract)" if extraction.already_complete else f"wrote {path}")


class _ExtractionProgress:
    """`extract`'s split progress as display updates (rows of each split, images/s). A split that was complete
    before this run is said to be so, once, instead of showing a bar at 0 img/s."""

    def __init__(self, display: ProgressDisplay):
        self._display = display
        self._complete_at_start: dict[str, bool] = {}

    @property
    def already_complete(self) -> bool:
        """Whether the run found every split complete: it wrote nothing."""
        return bool(self._complete_at_start) and all(self._complete_at_start.values())

    def __call__(self, split) -> None:
        if split.split not in self._complete_at_start:
            self._complete_at_start[split.split] = split.rows_at_start >= split.num_examples
            if self._complete_at_start[split.split]:
                _say(f"{split.split}: already complete ({split.num_examples} rows)")
        if self._complete_at_start[split.split]:
            return
        if split.rows_done > split.rows_at_start:
            detail = f"{split.images_per_second:.0f} img/s"
        else:
            detail = f"resuming at row {split.rows_at_start}" if split.rows_at_start else ""
        self._display(Update(split.split, split.rows_done, split.num_examples, detail))


@app.command()
def combine(
    features: List[pathlib.Path] = typer.Argument(..., help="Two or more feature files of the same examples: "
                                                  "same dataset, splits, labels and row order."),
    out: pathlib.Path = typer.Option(..., "--out", "-o", help="The combined feature file to write."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated share of each row's squared "
                                          "norm, one per file (normalised to sum 1); default: equal shares."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace an existing --out."),
):
    """Join feature files of different backbones row by row into one feature file: each file's part of a row
    rescaled to norm √weight, so every row has norm 1. Written whole or not at all."""
    from featdp.combine import combine as run_combine, parse_weights
    from featdp.featurefile import FeatureFile

    try:
        shares = parse_weights(weights, len(features))
        with ProgressDisplay(console) as display:
            path = run_combine(out, features, weights=shares, overwrite=overwrite, on_progress=display)
        with FeatureFile(path) as written:
            dim, names = written.metadata.feature_dim, written.split_names
    except _user_errors() as error:
        _fail(str(error))
    _say(f"wrote {path} (feature dim {dim}; splits {', '.join(names)})")


@app.command()
def backbones():
    """List the registered backbones: feature dimension, input size, checkpoint source."""
    from featdp.extraction.backbones.registry import backbone_specs

    table = Table("backbone", "feature dim", "input", "checkpoint source")
    for name, spec in backbone_specs().items():
        table.add_row(name, str(spec.feature_dim), f"{spec.image_size}x{spec.image_size}", spec.checkpoint_source)
    console.print(table)


@app.callback(invoke_without_command=True)
def _version(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    # Runs before every command. Off a terminal (a log, a pipe) rich would wrap every line and table at 80
    # columns, and a printed command or path could no longer be pasted back: there nothing is wrapped.
    for stream in (console, errors):
        stream.width = None if stream.is_terminal else UNWRAPPED_WIDTH
    if version:
        console.print(__version__)
        raise typer.Exit()


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
