"""What the proxy benchmarks share: seeded fits scored on a test set, and writing the finished table."""

from __future__ import annotations

import pathlib
import time

from featdp.methods import get_method
from featdp.training import fit


def seed_accuracies(train, test, method: str, overrides: dict, epsilon: float, delta: float,
                    seeds: int) -> list[float]:
    """Test top-1 % of `method` with `overrides` fitted at (ε, δ) with seeds 0 … seeds − 1."""
    return [100 * fit(train, get_method(method, **overrides), epsilon=epsilon, delta=delta,
                      seed=seed).accuracy(test) for seed in range(seeds)]


def finish(lines: list[str], started: float, out: pathlib.Path | None, stem: str) -> str:
    """Appends the whole run's time, prints the table and writes it to `out/stem.md` (unless out is None)."""
    lines.append(f"\nWhole run: {(time.perf_counter() - started) / 60:.1f} min.")
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.md").write_text(text)
    return text
