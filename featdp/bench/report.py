"""Bench results as tables (markdown, CSV of every fit, JSON) and a plot of accuracy against ε."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import pathlib
import statistics
from collections import defaultdict

from featdp.bench.runner import BenchConfig, BenchResult, BenchRow

KIND_ORDER = ("default", "auto", "private-tuned", "oracle", "peer", "non-private")
# What the markdown and the plot call each kind; csv/json keep the machine names above.
KIND_LABELS = {
    "default": "default",
    "auto": "recipe=auto (epochs from ñ·ε)",
    "private-tuned": "private-tuned",
    "oracle": "oracle selection (not private)",
    "peer": "peer",
    "non-private": "non-private",
}
# Tables written before private tuning named the oracle rows "tuned".
_OLD_KIND_NAMES = {"tuned": "oracle"}


def _order(key: tuple[str, str]) -> tuple:
    """featdp's private methods first, each with its default, auto, private-tuned and oracle rows side by side;
    then peers, then the non-private references."""
    kind, method = key
    group = {"peer": 1, "non-private": 2}.get(kind, 0)
    return group, method, KIND_ORDER.index(kind)


@dataclasses.dataclass(frozen=True)
class Cell:
    median: float
    std: float
    seconds: float  # median fit wall time
    count: int

    def text(self) -> str:
        spread = f" ± {100 * self.std:.1f}" if self.count > 1 else ""
        return f"{100 * self.median:.1f}{spread}"


def summarize(rows: list[BenchRow]) -> dict[tuple[str, str], dict[float | None, Cell]]:
    """(kind, method) → ε → median/std accuracy over seeds and median fit time."""
    groups: dict[tuple[str, str, float | None], list[BenchRow]] = defaultdict(list)
    for row in rows:
        groups[(row.kind, row.method, row.epsilon)].append(row)
    table: dict[tuple[str, str], dict[float | None, Cell]] = defaultdict(dict)
    for (kind, method, epsilon), group in groups.items():
        accuracies = [r.accuracy for r in group]
        table[(kind, method)][epsilon] = Cell(
            statistics.median(accuracies),
            statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            statistics.median(r.fit_seconds for r in group),
            len(group),
        )
    return dict(sorted(table.items(), key=lambda item: _order(item[0])))


def markdown(result: BenchResult, title: str, command: str) -> str:
    config = result.config
    table = summarize(result.rows)
    epsilons = list(config.epsilons)
    rdp = " (private-tuned rows: rdp)" if any(r.kind == "private-tuned" for r in result.rows) else ""
    lines = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"n = {result.num_train} train{_views_note(result)} / {result.num_test} test, d = {result.feature_dim}, "
        f"K = {result.num_classes}; δ = {config.delta:g}; {config.seeds} seeds (0…{config.seeds - 1}; seeded "
        f"noise, reproducible); accountant {config.accountant}{rdp}. Cells: test top-1 % median ± std over seeds.",
        "",
        "| kind | method | " + " | ".join(f"ε = {e:g}" for e in epsilons) + " | fit s (median) |",
        "|---|---|" + "---|" * len(epsilons) + "---|",
    ]
    for (kind, method), cells in table.items():
        if None in cells:  # non-private (a method or a peer): one value, repeated in every column
            cell = cells[None]
            values = [cell.text()] * len(epsilons)
            seconds = cell.seconds
        else:
            values = [cells[e].text() if e in cells else "—" for e in epsilons]
            seconds = statistics.median(c.seconds for c in cells.values())
        lines.append(f"| {KIND_LABELS[kind]} | {method} | " + " | ".join(values) + f" | {seconds:.2f} |")
    kinds = {row.kind for row in result.rows}
    private_tuned = [r for r in result.rows if r.kind == "private-tuned"]
    lines += ["", "* **default**: data-independent hyperparameters, the whole pipeline is (ε, δ)-DP."]
    if "auto" in kinds:
        lines.append(
            f"* **{KIND_LABELS['auto']}**: hyperparameters chosen by `recipe=auto` from the released count ñ "
            "and the method's ε only (its bands were chosen on public proxies: benchmarks/choose_epochs.py), "
            "with the rows centred on a released mean (`center`, its Gaussian inside the fit's ε); nothing is "
            "selected, so the whole fit is within the column's (ε, δ). Same seeds as the default rows."
        )
    if private_tuned or (config.private_tune and "default" in kinds):
        lines.append(
            "* **private-tuned**: hyperparameters chosen privately among the method's `tuning_grid` by "
            "`featdp.selection.select` (random stopping, Papernot & Steinke 2022; what `featdp tune` does): "
            "a released count, then K runs with K geometric of public mean R, each a uniformly drawn "
            "candidate fitted on the 90% fit part of the train split (split by a per-example hash) and "
            "scored by a noisy count of correct predictions on the other 10%; the best run's head is "
            "tested. The whole selection is within the column's (ε, δ): each run's RDP is the per-order "
            "maximum of its candidates' and its score's, mapped through Papernot–Steinke's theorem (the RDP "
            "accountant's RepeatAndSelectDpEvent rule). Fit s is the whole selection, every run "
            "included. Each row has its own seed, derived from (method, ε, seed): reruns reproduce it."
        )
        if private_tuned:
            lines.append("  " + _private_tuned_budget(private_tuned, epsilons))
        single = _single_candidate_methods(result.rows)
        if single:
            lines.append(
                f"* No private-tuned row for {', '.join(single)}: its tuning grid has a single candidate, so "
                "there is nothing to select and its default row is already private end to end."
            )
    if "oracle" in kinds:
        lines.append(
            "* **oracle selection (not private)**: hyperparameters chosen per ε on a held-out "
            f"{100 * config.holdout_fraction:g}% of the train split among each method's `tuning_grid`, then "
            "refitted on the whole train split; the privacy cost of that choice is **not** counted (as in "
            "the papers): an upper reference for what selection can give, not a private result."
        )
    lines += [
        "* **non-private**: the same features without privacy; the same value is repeated in every column.",
        "* **peer**: other libraries on the same unit-normalized features "
        "(diffprivlib is pure ε-DP: δ = 0).",
        f"* Fit times exclude calibration and the exact Gram pass, computed once and shared "
        f"({result.statistics_seconds:.1f} s). Whole run: {result.total_seconds / 60:.1f} min.",
    ]
    if result.skipped:
        lines.append("* Not run: " + "; ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    if private_tuned:
        lines += ["", "Private-tuned choices, per seed (the chosen run's released noisy validation accuracy %):", ""]
        for (method, eps), choices in _private_choices(private_tuned).items():
            lines.append(f"* {method} at ε = {eps:g}: " + "; ".join(
                f"seed {seed}: {params or 'defaults'} ({100 * acc:.1f})" for seed, params, acc in choices))
    auto = _auto_choices(result.rows)
    if auto:
        lines += ["", "recipe=auto choices (resolved from ñ·ε in each fit):", ""]
        lines += [f"* {method} recipe=auto at ε = {eps:g}: {choice}" for (method, eps), choice in auto.items()]
    tuned = _tuned_choices(result.rows)
    if tuned:
        lines += ["", "Oracle selection (not private) choices (held-out accuracy %):", ""]
        lines += [f"* {method} at ε = {eps:g}: {params or 'defaults'} "
                  + (f"({100 * acc:.1f})" if acc is not None else "(no other candidate)")
                  for (method, eps), (params, acc) in tuned.items()]
    return "\n".join(lines) + "\n"


def _private_tuned_budget(rows: list[BenchRow], epsilons: list[float]) -> str:
    """The largest total ε any private-tuned row reports, per column, against the column's target."""
    spent: dict[float, float] = {}
    for row in rows:
        if row.epsilon_spent is not None:
            spent[row.epsilon] = max(spent.get(row.epsilon, 0.0), row.epsilon_spent)
    parts = [f"ε = {e:g}: {spent[e]:.6g}" for e in epsilons if e in spent]
    mean_runs = sorted({(r.method, r.mean_runs) for r in rows if r.mean_runs is not None})
    runs = ", ".join(f"{method} R = {value:g}" for method, value in mean_runs)
    return (f"Total ε reported by the selection (largest over seeds): {'; '.join(parts)}"
            + (f". Mean number of runs: {runs}." if runs else "."))


def _single_candidate_methods(rows: list[BenchRow]) -> list[str]:
    from featdp.bench.runner import grid_size

    names = sorted({r.method for r in rows if r.kind == "default"})
    return [name for name in names if grid_size(name) < 2]


def _private_choices(rows: list[BenchRow]) -> dict:
    choices: dict = defaultdict(list)
    for row in sorted(rows, key=lambda r: (r.method, r.epsilon, r.seed)):
        choices[(row.method, row.epsilon)].append((row.seed, row.hyperparameters, row.validation_accuracy))
    return dict(choices)


def from_json(text: str) -> BenchResult:
    """A result back from `to_json` (to re-render tables and plots without refitting)."""
    record = json.loads(text)
    config = record["config"]
    for key in ("epsilons", "methods", "peers", "peer_epsilons"):
        if config.get(key) is not None:
            config[key] = tuple(config[key])
    if "private_tune" not in config:  # written before private tuning: it had no such rows
        config["private_tune"] = False
    if "auto" not in config:  # written before auto rows: it had none
        config["auto"] = False
    rows = [BenchRow(**(row | {"kind": _OLD_KIND_NAMES.get(row["kind"], row["kind"])})) for row in record["rows"]]
    return BenchResult(
        BenchConfig(**config), rows, record["num_train"],
        record["num_test"], record["feature_dim"], record["num_classes"], record["statistics_seconds"],
        record["total_seconds"], record["skipped"], record.get("train_views", 1),
    )


def _views_note(result: BenchResult) -> str:
    """How many views each training example has, when more than one (each counts as their average)."""
    if result.train_views == 1:
        return ""
    return f" (× {result.train_views} views each, averaged per example; peers see the first view)"


def _auto_choices(rows: list[BenchRow]) -> dict:
    """(method, ε) → the steps and schedule recipe=auto ran, once when every seed ran the same (ñ, hence the
    band, is drawn per seed), else per seed; the rest of what ran is in the csv/json rows."""
    runs: dict = defaultdict(list)
    for row in sorted((r for r in rows if r.kind == "auto"), key=lambda r: (r.method, r.epsilon, r.seed)):
        params = row.hyperparameters
        parts = ([f"{params['steps']} steps"] if "steps" in params else []) + (
            [f"schedule {params['schedule']}"] if "schedule" in params else [])
        runs[(row.method, row.epsilon)].append((row.seed, ", ".join(parts) or str(params)))
    choices = {}
    for key, seeded in runs.items():
        distinct = {text for _, text in seeded}
        choices[key] = distinct.pop() if len(distinct) == 1 else "; ".join(f"seed {s}: {t}" for s, t in seeded)
    return choices


def _tuned_choices(rows: list[BenchRow]) -> dict:
    choices = {}
    for row in rows:
        if row.kind == "oracle":
            choices[(row.method, row.epsilon)] = (row.hyperparameters, row.validation_accuracy)
    return choices


def rows_csv(rows: list[BenchRow]) -> str:
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(BenchRow)]
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        record = dataclasses.asdict(row)
        record["hyperparameters"] = json.dumps(record["hyperparameters"], sort_keys=True, default=str)
        writer.writerow(record)
    return buffer.getvalue()


def to_json(result: BenchResult, command: str) -> str:
    return json.dumps(
        {
            "command": command,
            "config": dataclasses.asdict(result.config),
            "num_train": result.num_train, "num_test": result.num_test,
            "feature_dim": result.feature_dim, "num_classes": result.num_classes,
            "statistics_seconds": result.statistics_seconds, "total_seconds": result.total_seconds,
            "skipped": result.skipped, "train_views": result.train_views,
            "rows": [dataclasses.asdict(r) for r in result.rows],
        },
        indent=1, default=str,
    )


def plot(result: BenchResult, path: pathlib.Path, title: str) -> None:
    """Writes `figure(result, title)` to `path`."""
    import matplotlib.pyplot as plt

    chart = figure(result, title)
    chart.savefig(path)
    plt.close(chart)


def figure(result: BenchResult, title: str):
    """Median test accuracy against ε (log axis) per method and kind; non-private levels as horizontal
    lines, named in the legend (labels beside the lines collided when levels were close). The caller
    closes the figure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    chart, axis = plt.subplots(figsize=(8, 5), dpi=120)
    # One colour per method; the kind is the line style: private-tuned solid, oracle dashed, auto dash-dot
    # (as peers, which have colours of their own; the marker tells them apart).
    styles = {"default": ":o", "auto": "-.v", "private-tuned": "-D", "oracle": "--s", "peer": "-.^"}
    table = summarize(result.rows)
    methods = list(dict.fromkeys(method for (kind, method), cells in table.items() if None not in cells))
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    # The axis spans featdp's own rows; a peer far below them is named in the title instead of
    # squashing every other curve into a band.
    own = [c.median for (kind, _), cells in table.items() if kind != "peer" for c in cells.values()]
    bottom = max(0.0, 100 * min(own) - 3) if own else 0.0
    below = []
    references = [(method, cells[None].median) for (kind, method), cells in table.items() if None in cells]
    for index, (method, median) in enumerate(references):
        level = 100 * median
        # Gray levels told apart by dash pattern: the legend is the only place that names them.
        axis.axhline(level, color="gray", lw=1, ls=(0, _DASHES[index % len(_DASHES)]),
                     label=f"{method} (non-private) {level:.1f}")
    for (kind, method), cells in table.items():
        if None in cells:
            continue
        epsilons = sorted(e for e in cells if e is not None)
        medians = [100 * cells[e].median for e in epsilons]
        if max(medians) < bottom:
            below.append(f"{method} ≤ {max(medians):.0f}%")
            continue
        axis.errorbar(epsilons, medians, yerr=[100 * cells[e].std for e in epsilons], fmt=styles[kind], ms=4,
                      capsize=2, color=colours[method], label=f"{method}, {KIND_LABELS[kind]}")
    axis.set_ylim(bottom=bottom)
    if below:
        title = f"{title}\n(below the axis: {', '.join(below)})"
    axis.set_xscale("log")
    axis.set_xticks(list(result.config.epsilons), [f"{e:g}" for e in result.config.epsilons])
    axis.minorticks_off()
    axis.set_xlabel(f"ε (δ = {result.config.delta:g})")
    axis.set_ylabel("test top-1 (%)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, ncol=2, loc="best")
    chart.tight_layout()
    return chart


_DASHES = ((4, 2), (1, 1.5), (6, 2, 1, 2), (2, 3), (8, 2, 1, 2, 1, 2))


def write_all(result: BenchResult, out_dir: pathlib.Path, stem: str, title: str, command: str) -> list[pathlib.Path]:
    """Writes <stem>.md, .csv, .json and .png into `out_dir`; each file appears whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {
        f"{stem}.md": markdown(result, title, command),
        f"{stem}.csv": rows_csv(result.rows),
        f"{stem}.json": to_json(result, command),
    }
    written = []
    for name, text in outputs.items():
        written.append(_atomic_write_text(out_dir / name, text))
    png = out_dir / f"{stem}.png"
    partial = png.with_name(png.name + ".partial.png")
    plot(result, partial, title)
    partial.replace(png)
    written.append(png)
    return written


def _atomic_write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path
