"""The bench plot names every non-private reference where it can be read: reference levels a fraction of a
point apart (ridge 90.8, logreg 89.6, scikit-learn's logreg 89.6) once had their labels drawn over each other."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt

from featdp.bench import report
from featdp.bench.runner import BenchConfig, BenchResult, BenchRow


def _result() -> BenchResult:
    rows = [BenchRow("default", "dp-fc", e, 1e-5, 0, a, 1.0, {}) for e, a in ((1.0, 0.834), (3.0, 0.858))]
    rows += [BenchRow(kind, name, None, None, 0, accuracy, 1.0, {})
             for kind, name, accuracy in (("non-private", "ridge", 0.908), ("non-private", "logreg", 0.896),
                                          ("peer", "sklearn-logreg", 0.8961), ("non-private", "lsq", 0.9075))]
    return BenchResult(BenchConfig(epsilons=(1.0, 3.0), seeds=1), rows, 100, 50, 8, 3, 0.1, 1.0, {})


def test_close_reference_levels_are_named_in_the_legend_and_no_labels_overlap():
    chart = report.figure(_result(), "close references")
    try:
        axis = chart.axes[0]
        legend = [text.get_text() for text in axis.get_legend().get_texts()]
        for label in ("ridge (non-private) 90.8", "logreg (non-private) 89.6", "sklearn-logreg (non-private) 89.6",
                      "lsq (non-private) 90.8"):
            assert label in legend, legend
        chart.canvas.draw()
        renderer = chart.canvas.get_renderer()
        boxes = [text.get_window_extent(renderer) for text in axis.texts if text.get_text()]
        for first, second in itertools.combinations(boxes, 2):
            assert not first.overlaps(second), (first, second)
        assert len([line for line in axis.get_lines() if "non-private" in line.get_label()]) == 4
    finally:
        plt.close(chart)


def test_plot_writes_the_figure(tmp_path):
    path = tmp_path / "bench.png"
    report.plot(_result(), path, "close references")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
