"""Curves that read on short runs: integer step ticks, a legend for raw and smoothed lines,
coinciding lines kept apart by style and markers."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from safegrpo_pl.run.curves import TrainingHistory, build_figure, plot_curves


def _short_history() -> TrainingHistory:
    parts = ("train/reward", "train/reward_format", "train/reward_tag", "train/reward_behavior")
    train = [{"step": s, **dict.fromkeys(parts, 1.0), "train/kl": 0.01 * s} for s in (1, 2, 3)]
    figures = ("val/safety_score", "val/refusal_rate", "val/compositional_safety_score")
    val = [{"step": s, **dict.fromkeys(figures, 1.0)} for s in (0, 3)]
    return TrainingHistory(train, val)


def test_three_step_curves_have_integer_ticks_a_raw_smoothed_legend_and_distinct_lines():
    figure = build_figure(_short_history(), smoothing=10)
    try:
        reward_ax, kl_ax, safety_ax, refusal_ax = figure.axes[:4]
        for ax in (reward_ax, kl_ax, safety_ax, refusal_ax):
            assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
            figure.canvas.draw()
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        labels = [t.get_text() for t in reward_ax.get_legend().get_texts()]
        assert {"reward", "format", "tag", "behaviour"} <= set(labels)
        assert "per step" in labels and "mean of 10 steps" in labels
        # the four reward curves all sit at 1.0: each must differ in style or marker
        smoothed = [line for line in reward_ax.get_lines() if line.get_linewidth() == 2]
        looks = {(line.get_linestyle(), line.get_marker()) for line in smoothed}
        assert len(smoothed) == 4 and len(looks) == 4
        # a policy refusing everything: every held-out figure at 1.0. The refusal rate gets its
        # own panel; the rest differ in style, marker and marker size (hollow, nested).
        assert [line.get_label() for line in refusal_ax.get_lines()] == ["refusal rate"]
        lines = safety_ax.get_lines()
        looks = {(x.get_linestyle(), x.get_marker(), x.get_markersize()) for x in lines}
        assert len(lines) == len(looks) == 2, "coinciding held-out lines must look different"
        assert all(x.get_markerfacecolor() == "none" for x in lines), "hollow: both show"
        assert figure._suptitle.get_text() == "SafeGRPO: training curves"
    finally:
        plt.close(figure)


def test_plot_curves_writes_a_png(tmp_path):
    out = plot_curves(_short_history(), tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
