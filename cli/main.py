"""The `featdp` command: a thin typer layer over the library. Parse, call, print; no math here."""

from __future__ import annotations

import contextlib
import json
import pathlib
import sys
import warnings
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from featdp import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Differentially private linear heads on frozen pretrained features.",
)
console = Console()
errors = Console(stderr=True)
# User-derived text (paths, split and attribute values, messages quoting them) is printed as rich `Text`
# or through `escape`, never as markup: `[bold]` or `[nan]` in a value would vanish and `[/x]` would crash.


def _user_errors() -> tuple[type[Exception], ...]:
    from featdp.accounting import PrivacyParameterError
    from featdp.data import DataError
    from featdp.featurefile import FeatureFileError
    from featdp.methods import HyperparameterError
    from featdp.backend import DeviceError
    from featdp.report import OutputError

    return (PrivacyParameterError, DataError, FeatureFileError, HyperparameterError, OutputError, DeviceError)


def _extraction_errors() -> tuple[type[Exception], ...]:
    from featdp.extraction.backbones.registry import BackboneError
    from featdp.extraction.datasets import DatasetError
    from featdp.extraction.extract import ExtractError
    from featdp.featurefile import FeatureFileError

    # Checkpoint readers raise their own ValueError subclasses and FileNotFoundError for missing files;
    # a directory given as a checkpoint is IsADirectoryError.
    return (BackboneError, DatasetError, ExtractError, FeatureFileError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError, ValueError)


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


@app.command()
def fit(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help="Feature file (HDF5)."),
    method: str = typer.Option("dp-fc", "--method", "-m", help="Method name; see `featdp methods`."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Target epsilon (required for private methods)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="Target delta; default: a power of ten ≤ 0.1/ñ (ñ: the released count)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the noise (any integer, hashed whole; reproducible, but predictable)."),
    accountant: str = typer.Option("pld", "--accountant", help="pld (default, exact for Gaussians) or rdp."),
    sets: List[str] = typer.Option([], "--set", help="Hyperparameter KEY=VALUE; repeatable."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Output directory for head + report."),
    train_split: str = typer.Option("train", "--train-split"),
    test_split: str = typer.Option("test", "--test-split", help=TEST_SPLIT_HELP),
    device: str = typer.Option("auto", "--device", help="Where the passes over the data run: auto (an "
                               "accelerator if JAX has one, else numpy on the CPU), cpu, gpu or tpu. Noise is "
                               "always drawn on the host."),
):
    """Train a private linear head on the train split and report test accuracy."""
    from featdp.jobs import fit_feature_file
    from featdp.methods import get_method

    overrides = _parse_sets(sets)
    try:
        method_obj = get_method(method)
        method_obj = type(method_obj).from_strings(overrides)
        if out is None:
            out = pathlib.Path("heads") / (f"{method}_eps{eps:g}" if eps is not None else method)
        with _warnings_printed():
            job = fit_feature_file(
                features, method_obj, epsilon=eps, delta=delta, seed=seed, accountant=accountant,
                train_split=train_split, test_split=test_split, out_dir=out, device=device,
            )
    except _user_errors() as error:
        _fail(str(error))
    _print_summary(job)


def _print_summary(job) -> None:
    report = job.report
    table = Table(show_header=False, box=None)
    table.add_row("method", report["method"])
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


@app.command()
def tune(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help="Feature file (HDF5)."),
    methods: List[str] = typer.Option(["dp-fc"], "--method", "-m", help="A private method to tune; repeatable."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Target epsilon of the whole selection (required)."),
    delta: Optional[float] = typer.Option(None, "--delta", help="Target delta; default: a power of ten ≤ 0.1/ñ (ñ: the released count)."),
    grids: List[str] = typer.Option([], "--grid", help="KEY=V1,V2: candidates are the product over all --grid keys, for every --method; default: each method's tuning grid."),
    mean_runs: float = typer.Option(10.0, "--mean-runs", help="Mean number of runs R (the number is random: it is what makes the selection cheap)."),
    shape: float = typer.Option(1.0, "--shape", help="Shape of the law of the number of runs: 1 geometric (default), 0 logarithmic, else truncated negative binomial."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the noise and the draws (reproducible, but predictable)."),
    accountant: str = typer.Option("rdp", "--accountant", help="rdp (the only accountant with the Papernot–Steinke bound)."),
    out: Optional[pathlib.Path] = typer.Option(None, "--out", help="Output directory for head + report."),
    train_split: str = typer.Option("train", "--train-split"),
    test_split: str = typer.Option("test", "--test-split", help=TEST_SPLIT_HELP),
):
    """Choose a method and hyperparameters privately (random stopping, Papernot & Steinke 2022) and write the chosen head."""
    from featdp.jobs import tune_feature_file
    from featdp.selection import RunsDistribution, SelectionError, build_candidates, parse_grid

    if eps is None:
        _fail("--eps is required: the selection is private, and its target epsilon covers every run")
    try:
        grid = parse_grid(grids)
        RunsDistribution(mean_runs, shape)
        build_candidates(methods, grid, 1000.0)  # unknown or non-private methods, bad grid keys and values
        if out is None:
            out = pathlib.Path("heads") / f"tune_eps{eps:g}"
        # RuntimeWarnings are numpy's, from the accountants' searches.
        with _warnings_printed(ignore=(RuntimeWarning,)), _run_progress() as progress:
            job = tune_feature_file(
                features, methods, epsilon=eps, delta=delta, mean_runs=mean_runs, shape=shape, grid=grid,
                seed=seed, accountant=accountant, train_split=train_split, test_split=test_split, out_dir=out,
                on_run=progress,
            )
    except (SelectionError, *_user_errors()) as error:
        _fail(str(error))
    _print_tune_summary(job)


class _run_progress:  # noqa: N801 - used as a context manager
    """A rich progress bar over the selection's runs, on a terminal only. The number of runs is not covered
    by the privacy guarantee: the operator may watch it, but it is kept out of logs and reports."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = self._task = None
        if console.is_terminal:
            self._bar = Progress(TextColumn("runs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=console, transient=True)
            self._bar.__enter__()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            return
        if self._task is None:
            self._task = self._bar.add_task("runs", total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc_info):
        if self._bar is not None:
            self._bar.__exit__(*exc_info)


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
def info(features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"))):
    """Print a feature file's metadata and splits."""
    from featdp.featurefile import FeatureFile

    try:
        with FeatureFile(features) as handle:
            meta = handle.metadata.to_json_dict()
            table = Table(title=Text(str(features)), show_header=False)
            for key, value in meta.items():
                text = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
                table.add_row(Text(key), Text(text if len(text) < 200 else text[:197] + "..."))
            console.print(table)
            splits = Table("split", "examples", "rows done", "dim", "dtype", "complete")
            for name in handle.split_names:
                split = handle.split(name, require_complete=False)
                splits.add_row(Text(name), str(split.num_examples), str(split.rows_done), str(split.feature_dim),
                               Text(str(split.dtype)), str(split.complete))
            console.print(splits)
    except _user_errors() as error:
        _fail(str(error))


@app.command()
def methods():
    """List the registered methods and their hyperparameters."""
    import dataclasses

    from featdp.methods import registry

    table = Table("method", "private", "hyperparameters (defaults)")
    for name, cls in sorted(registry().items()):
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        table.add_row(name, "yes" if cls.private else "[red]no[/]", fields)
    console.print(table)


AUDIT_MODES = ("canary", "one-run", "white-box")


@app.command()
def audit(
    method: str = typer.Option(..., "--method", "-m", help="Method name; see `featdp methods`."),
    eps: float = typer.Option(..., "--eps", help="The claimed epsilon."),
    delta: float = typer.Option(1e-5, "--delta", help="The claimed delta."),
    trials: int = typer.Option(2000, "--trials", help="Fits (canary, white-box) or canaries in one fit (one-run)."),
    mode: str = typer.Option("canary", "--mode", help="canary, one-run or white-box."),
    score: str = typer.Option("releases", "--score", help="releases (likelihood ratio) or head (logit margin)."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence of the empirical lower bound."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the audit's noise and canaries."),
    accountant: str = typer.Option("pld", "--accountant", help="Accountant that calibrates the claim."),
    sets: List[str] = typer.Option([], "--set", help="Hyperparameter KEY=VALUE; repeatable."),
):
    """Empirical privacy audit: a lower bound on ε from canaries; exit 1 if it exceeds the claim."""
    from featdp.methods import get_method

    overrides = _parse_sets(sets)
    if mode not in AUDIT_MODES:
        _fail(f"--mode must be one of {', '.join(AUDIT_MODES)}, got {mode!r}")
    try:
        method_obj = type(get_method(method)).from_strings(overrides)
        if mode == "white-box":
            _print_white_box(_run_white_box(method_obj, eps, delta, trials, seed, accountant))
        else:
            _print_audit(_run_canary_audit(method_obj, eps, delta, trials, mode, score, confidence, seed, accountant))
    except _user_errors() as error:
        _fail(str(error))


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
    out: pathlib.Path = typer.Option(pathlib.Path("runs/demo"), "--out"),
    backbone: str = typer.Option("scatternet", "--backbone", "-b"),
    eps: str = typer.Option("1,3", "--eps", help="Comma-separated epsilons."),
    delta: float = typer.Option(1e-5, "--delta"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most N images per split."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder of the Fashion-MNIST IDX files."),
):
    """The main job, offline: Fashion-MNIST → frozen backbone → every method at a few ε → one table."""
    import time

    from featdp.extraction.extract import ExtractConfig, extract as run_extract
    from featdp.jobs import fit_feature_file
    from featdp.methods import method_names
    from featdp.methods.dp_sgd import tramer_boneh_recipe

    epsilons = [float(e) for e in eps.split(",")]
    out.mkdir(parents=True, exist_ok=True)
    # One file per (backbone, limit): a quick `--limit` run neither clashes with nor replaces the full file.
    features = out / f"fashion_mnist_{backbone}{f'_first{limit}' if limit else ''}.h5"
    console.print(f"[bold]1/2[/] extracting Fashion-MNIST {'(first %d images per split) ' % limit if limit else ''}"
                  f"with {escape(backbone)} into {escape(str(features))} (resumable; reused when complete)")
    started = time.perf_counter()
    try:
        with _progress_reporter() as report:
            run_extract(ExtractConfig(backbone=backbone, dataset="fashion_mnist", out=features, limit=limit,
                                      data_dir=data_dir, batch_size=min(512, limit or 512)), on_progress=report)
    except _extraction_errors() as error:
        _fail(str(error))
    console.print(f"    extraction: {time.perf_counter() - started:.0f} s")
    console.print(f"[bold]2/2[/] fitting every method at ε ∈ {{{eps}}}, δ = {delta:g} (noise from the OS)")
    table = Table("method", *[f"ε={e:g}" for e in epsilons], "fit s (each)",
                  title=f"Fashion-MNIST test top-1, {backbone} features")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in method_names(private=True):
            jobs = [fit_feature_file(features, name, epsilon=e, delta=delta, out_dir=out / f"{name}_eps{e:g}")
                    for e in epsilons]
            seconds = "/".join(f"{job.result.fit_seconds:.0f}" for job in jobs)
            table.add_row(name, *[f"{job.test_accuracy:.4f}" for job in jobs], seconds)
        # The published multi-epoch recipe beside the one-step default: the defaults above are what
        # `featdp fit` does unconfigured; this row is what DP-SGD does when given its paper's settings.
        # The batch keeps the recipe's rate for Fashion-MNIST's public size (60,000 train images, or the
        # user's --limit): never derived from the file's own row count, which a fit treats as private.
        recipe = tramer_boneh_recipe(min(limit, 60_000) if limit else 60_000)
        jobs = [fit_feature_file(features, "dp-sgd", epsilon=e, delta=delta, hyperparameters=recipe,
                                 out_dir=out / f"dp-sgd-recipe_eps{e:g}") for e in epsilons]
        table.add_row("dp-sgd (Tramèr–Boneh recipe)", *[f"{job.test_accuracy:.4f}" for job in jobs],
                      "/".join(f"{job.result.fit_seconds:.0f}" for job in jobs))
        for name in method_names(private=False):
            job = fit_feature_file(features, name, epsilon=None, out_dir=out / name)
            table.add_row(f"{name} (non-private)", *[f"{job.test_accuracy:.4f}"] * len(epsilons),
                          f"{job.result.fit_seconds:.0f}")
    console.print(table)
    settings = " ".join(f"--set {k}={v:g}" for k, v in recipe.items())
    console.print(f"dp-sgd's default is one full-batch step (a noisy class-mean classifier); the recipe row is "
                  f"`featdp fit --method dp-sgd {settings}` ({recipe['steps']} Poisson-sampled steps).",
                  highlight=False)
    if backbone == "scatternet" and not limit:
        console.print("published: Tramèr & Boneh 2021, ScatterNet + linear head, DP-SGD: 89.7% at ε = 3, δ = 1e-5.")
    console.print(f"total {time.perf_counter() - started:.0f} s; heads and privacy reports under {escape(str(out))}/",
                  highlight=False)


@app.command()
def bench(
    features: pathlib.Path = typer.Argument(pathlib.Path("features.h5"), help="Feature file (HDF5)."),
    eps: str = typer.Option("0.1,0.5,1,2,3,4,8", "--eps", help="Comma-separated epsilons."),
    delta: float = typer.Option(1e-5, "--delta"),
    seeds: int = typer.Option(5, "--seeds", help="Fits per (method, ε); seeds 0…N−1."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated; default: every method."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Also report oracle rows: hyperparameters chosen on held-out train data, NOT private."),
    private_tune: bool = typer.Option(True, "--private-tune/--no-private-tune", help="Also report private-tuned rows: hyperparameters chosen by `featdp tune`'s random stopping within the same ε."),
    mean_runs: Optional[float] = typer.Option(None, "--mean-runs", help="Mean number of runs R of the private selection; default: each method's grid size."),
    peers: str = typer.Option("", "--peers", help="Comma-separated peers: opacus-dpsgd, diffprivlib-logreg, sklearn-logreg."),
    peer_eps: Optional[str] = typer.Option(None, "--peer-eps", help="ε for the private peers; default: --eps."),
    peer_seeds: Optional[int] = typer.Option(None, "--peer-seeds", help="Seeds for the peers; default: --seeds."),
    out: pathlib.Path = typer.Option(pathlib.Path("bench"), "--out", help="Directory for .md/.csv/.json/.png."),
    name: Optional[str] = typer.Option(None, "--name", help="File stem; default: the feature file's stem."),
    train_split: str = typer.Option("train", "--train-split"),
    test_split: str = typer.Option("test", "--test-split"),
    accountant: str = typer.Option("pld", "--accountant"),
):
    """Every method × ε × seed on one feature file (plus private-tuned, oracle, non-private and peer rows): tables and a plot."""
    from featdp.bench import report as bench_report
    from featdp.bench.runner import BenchConfig, BenchError, load_splits, run_bench

    command = " ".join(
        [f"featdp bench {features} --eps {eps} --delta {delta:g} --seeds {seeds}"]
        + ([f"--methods {methods}"] if methods else []) + ([] if tune else ["--no-tune"])
        + ([] if private_tune else ["--no-private-tune"]) + ([f"--mean-runs {mean_runs:g}"] if mean_runs is not None else [])
        + ([f"--peers {peers}"] if peers else []) + ([f"--peer-eps {peer_eps}"] if peer_eps else [])
        + ([f"--peer-seeds {peer_seeds}"] if peer_seeds else []) + ([f"--accountant {accountant}"] if accountant != "pld" else [])
    )
    try:
        epsilons = tuple(float(e) for e in eps.split(","))
        peer_epsilons = tuple(float(e) for e in peer_eps.split(",")) if peer_eps else None
    except ValueError:
        _fail(f"--eps and --peer-eps expect comma-separated numbers, got {eps!r} / {peer_eps!r}")
    try:
        config = BenchConfig(
            epsilons=epsilons, delta=delta, seeds=seeds, tune=tune, private_tune=private_tune, mean_runs=mean_runs,
            accountant=accountant, methods=tuple(methods.split(",")) if methods else None,
            peers=tuple(p for p in peers.split(",") if p), peer_epsilons=peer_epsilons, peer_seeds=peer_seeds,
        )
        train, test = load_splits(features, train_split, test_split)

        def show(row):
            budget = "non-private" if row.epsilon is None else f"ε={row.epsilon:g} seed {row.seed}"
            spent = f"  (reported ε {row.epsilon_spent:.4f})" if row.kind == "private-tuned" else ""
            console.print(f"  {row.kind:<13} {row.method:<20} {budget:<18} {100 * row.accuracy:5.1f}%  "
                          f"{row.fit_seconds:7.2f} s{spent}", highlight=False, soft_wrap=True)

        result = run_bench(train, test, config, on_row=show)
    except (BenchError, *_user_errors()) as error:
        _fail(str(error))
    stem = name or features.stem
    paths = bench_report.write_all(result, out, stem, f"featdp bench: {features.name}", command)
    console.print(bench_report.markdown(result, f"featdp bench: {features.name}", command), highlight=False)
    console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command()
def extract(
    backbone: str = typer.Option("efficientnet-lite0", "--backbone", "-b", help="See `featdp backbones`."),
    dataset: str = typer.Option("fashion_mnist", "--dataset", "-d",
                                help="fashion_mnist, tfds:NAME or folder:PATH (PATH/<split>/<class>/<image>)."),
    out: pathlib.Path = typer.Option(pathlib.Path("features.h5"), "--out", "-o"),
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
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a file made by a different command."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16."),
    workers: Optional[int] = typer.Option(
        None, "--workers", help="Loader processes decoding and resizing images (default: min(16, CPU count)); 0 or 1 loads in this process."
    ),
):
    """Extract features of a frozen backbone into a feature file (resumable: re-run the same command)."""
    from featdp.extraction.extract import ExtractConfig, extract as run_extract

    if workers is not None and workers < 0:
        # extract.py starts loader processes only for workers > 1: 0 and 1 both load in this process.
        _fail(f"--workers must be ≥ 0 (0 or 1: load in this process), got {workers}")
    config = ExtractConfig(
        backbone=backbone, dataset=dataset, out=out, splits=tuple(splits.split(",")) if splits else None,
        data_dir=data_dir, checkpoint=checkpoint, checkpoint_sha256=checkpoint_sha256, batch_size=batch_size,
        limit=limit, overwrite=overwrite, dtype=dtype, **({} if workers is None else {"workers": workers}),
    )
    try:
        with _progress_reporter() as report:
            path = run_extract(config, on_progress=report)
    except _extraction_errors() as error:
        _fail(str(error))
    console.print(Text(f"wrote {path}"))


class _progress_reporter:  # noqa: N801 - used as a context manager
    """A rich progress bar with images/s on a terminal; one plain line per batch otherwise."""

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._tasks: dict[str, int] = {}
        self._bar = None
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.0f} img/s"), TimeRemainingColumn(), console=console,
            )
            self._bar.__enter__()
        return self

    def __call__(self, progress) -> None:
        if self._bar is None:
            console.print(Text(f"{progress.split}: {progress.rows_done}/{progress.num_examples} rows, "
                               f"{progress.images_per_second:.0f} img/s"), highlight=False)
            return
        if progress.split not in self._tasks:
            self._tasks[progress.split] = self._bar.add_task(escape(progress.split), total=progress.num_examples,
                                                             rate=0.0)
        self._bar.update(self._tasks[progress.split], completed=progress.rows_done, rate=progress.images_per_second)

    def __exit__(self, *exc_info):
        if self._bar is not None:
            self._bar.__exit__(*exc_info)


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
    if version:
        console.print(__version__)
        raise typer.Exit()


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
