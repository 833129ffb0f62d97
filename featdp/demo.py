"""The main job, offline (`featdp demo`): Fashion-MNIST → a frozen backbone → every method at a few ε.

`Demo` holds the public settings and says where everything goes; `Demo.extract()` writes (or reuses) the
feature file; `Demo.rows()` fits every method and yields each table row as soon as its fits are done, so a
caller can show it at once — the whole grid takes minutes on a laptop CPU. Every head and privacy report is
written under `out`, one directory per (method, ε).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings
from typing import Callable, Iterator

from featdp import progress

# Fashion-MNIST's train split: public, the size the Tramèr–Boneh recipe's batch is scaled from.
FASHION_MNIST_TRAIN = 60_000
PUBLISHED = "Tramèr & Boneh 2021, ScatterNet + linear head, DP-SGD: 89.7% at ε = 3, δ = 1e-5."


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One line of the demo's table: a method's test top-1 and fit time at every ε (a non-private
    reference is fitted once: one accuracy and one time, the same in every column)."""

    label: str  # "dp-fc", "dp-sgd (Tramèr–Boneh recipe)", "ridge (non-private)"
    accuracies: tuple[float, ...]  # per ε, or one value for a non-private reference
    fit_seconds: tuple[float, ...]
    private: bool


@dataclasses.dataclass(frozen=True)
class Demo:
    """The demo's public settings, checked when built, and its two steps: `extract`, then `rows`."""

    out: pathlib.Path = pathlib.Path("runs/demo")
    backbone: str = "scatternet"  # or several joined by "+": each extracted, then combined (`featdp combine`)
    epsilons: tuple[float, ...] = (1.0, 3.0)  # each private method is fitted at each
    delta: float = 1e-5
    limit: int | None = None  # at most this many images per split
    data_dir: str | os.PathLike | None = None  # folder of the Fashion-MNIST IDX files; None: Debian's

    def __post_init__(self):
        """Refuses a bad ε, δ, limit or backbone (`PrivacyParameterError`, `ExtractError`, `BackboneError`)
        before any work is done."""
        from featdp.accounting import PrivacyParameterError, check_privacy_parameters
        from featdp.extraction.extract import ExtractError

        object.__setattr__(self, "epsilons", tuple(float(e) for e in self.epsilons))
        if not self.epsilons:
            raise PrivacyParameterError("the demo needs at least one ε")
        for epsilon in self.epsilons:
            check_privacy_parameters(epsilon, self.delta)
        if self.limit is not None and self.limit < 1:
            raise ExtractError(f"limit must be ≥ 1, got {self.limit}")
        names = self.backbones
        if not all(names) or len(set(names)) != len(names):
            raise ExtractError(f"backbone {self.backbone!r}: name one backbone, or several different ones joined "
                               "by '+' (e.g. scatternet+efficientnet-lite0)")
        from featdp.extraction.backbones.registry import get_backbone_spec

        for name in names:  # all of them now: not after a first backbone's extraction
            get_backbone_spec(name)

    @property
    def backbones(self) -> tuple[str, ...]:
        """The backbones whose features the demo fits on: one, or several to be combined."""
        return tuple(self.backbone.split("+"))

    def backbone_file(self, backbone: str) -> pathlib.Path:
        """Where `backbone`'s own features go: one file per (backbone, limit)."""
        suffix = f"_first{self.limit}" if self.limit else ""
        return pathlib.Path(self.out) / f"fashion_mnist_{backbone}{suffix}.h5"

    @property
    def features(self) -> pathlib.Path:
        """The file the methods are fitted on, one per (backbones, limit): a quick `limit` run neither clashes
        with nor replaces the full file."""
        return self.backbone_file(self.backbone)

    @property
    def recipe(self) -> dict:
        """The Tramèr–Boneh DP-SGD hyperparameters. The batch keeps the recipe's rate for Fashion-MNIST's
        public size (60,000 train images, or `limit`): never derived from the file's own row count, which a
        fit treats as private."""
        from featdp.methods.dp_sgd import tramer_boneh_recipe

        return tramer_boneh_recipe(min(self.limit, FASHION_MNIST_TRAIN) if self.limit else FASHION_MNIST_TRAIN)

    def recipe_command(self) -> str:
        """The `featdp fit` command that fits the recipe row's head on a feature file."""
        return "featdp fit --method dp-sgd " + " ".join(f"--set {k}={v:g}" for k, v in self.recipe.items())

    @property
    def published(self) -> str | None:
        """The published figure this run compares with (ScatterNet + linear head): shown for the full dataset
        with ScatterNet among the backbones."""
        return PUBLISHED if "scatternet" in self.backbones and not self.limit else None

    def extract(self, on_progress: Callable | None = None) -> pathlib.Path:
        """Writes the feature file, or finishes or reuses it (extraction is resumable); returns its path.
        `on_progress` receives `featdp.extraction.extract.SplitProgress` updates. Several backbones: each is
        extracted (`extract_backbone`), then they are combined (`combine`)."""
        for backbone in self.backbones:
            self.extract_backbone(backbone, on_progress)
        return self.combine() if len(self.backbones) > 1 else self.features

    def extract_backbone(self, backbone: str, on_progress: Callable | None = None) -> pathlib.Path:
        """Writes, finishes or reuses `backbone`'s own feature file (`backbone_file`); returns its path."""
        from featdp.extraction.extract import ExtractConfig, extract

        pathlib.Path(self.out).mkdir(parents=True, exist_ok=True)
        config = ExtractConfig(backbone=backbone, dataset="fashion_mnist", out=self.backbone_file(backbone),
                               limit=self.limit, data_dir=None if self.data_dir is None else str(self.data_dir),
                               batch_size=min(512, self.limit or 512))
        return extract(config, on_progress=on_progress)

    def combine(self) -> pathlib.Path:
        """Joins the backbones' files into `features` at equal shares (`featdp.combine`), replacing an older
        join (it takes seconds, and its sources may have been re-extracted since)."""
        from featdp.combine import combine

        return combine(self.features, [self.backbone_file(b) for b in self.backbones], overwrite=True)

    def rows(self) -> Iterator[DemoRow]:
        """Fits every private method at its defaults at each ε, then DP-SGD with recipe=auto and with the
        Tramèr–Boneh recipe, then the non-private references; yields each row when its last fit is done.
        Noise comes from the OS. Needs the feature file (`extract`). Reports progress over the fits
        (`featdp.progress`)."""
        from featdp.methods import method_names

        private = method_names(private=True)
        public = method_names(private=False)
        total = (len(private) + 2) * len(self.epsilons) + len(public)
        done = 0
        progress.report("demo fits", done, total)

        def fits(label: str, name: str, directory: str, epsilons, hyperparameters: dict | None = None) -> DemoRow:
            """`name` at each ε (None: non-private), written to `out/<directory>_eps<ε>` (or `out/<directory>`)."""
            nonlocal done
            jobs = []
            for epsilon in epsilons:
                out = pathlib.Path(self.out) / (directory if epsilon is None else f"{directory}_eps{epsilon:g}")
                jobs.append(self._fit(name, epsilon, hyperparameters, out))
                done += 1
                progress.report("demo fits", done, total)
            return DemoRow(label, tuple(job.test_accuracy for job in jobs),
                           tuple(job.result.fit_seconds for job in jobs), epsilons != (None,))

        for name in private:
            yield fits(name, name, name, self.epsilons)
        # Multi-epoch DP-SGD beside the one-step default: recipe=auto chooses its epochs from the budget
        # (public proxies only); the Tramèr–Boneh row is what DP-SGD does given its paper's settings, which
        # were tuned on this dataset outside any privacy budget.
        yield fits("dp-sgd (recipe=auto)", "dp-sgd", "dp-sgd-auto", self.epsilons, {"recipe": "auto"})
        yield fits("dp-sgd (Tramèr–Boneh recipe)", "dp-sgd", "dp-sgd-recipe", self.epsilons, self.recipe)
        for name in public:
            yield fits(f"{name} (non-private)", name, name, (None,))

    def _fit(self, method: str, epsilon: float | None, hyperparameters: dict | None, out: pathlib.Path):
        from featdp.jobs import fit_feature_file

        # The demo's δ and --limit are fixed by its command: a δ ≥ 1/n warning on a tiny --limit run, or
        # numpy's from the accountants' searches, would only bury the table.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            delta = None if epsilon is None else self.delta
            return fit_feature_file(self.features, method, epsilon=epsilon, delta=delta,
                                    hyperparameters=hyperparameters, out_dir=out)
