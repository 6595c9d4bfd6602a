"""The curves over optimiser steps: the history the report callback collects, and its figure.

`TrainingHistory` holds the logged scalars per training step and per held-out evaluation;
`plot_curves` draws them into `curves.png` (see `safegrpo_pl.run.report.write_report`): train
reward and its three parts, KL to the reference, and the held-out safety score, refusal rate,
compositional safety score and mean reward, over optimiser steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safegrpo_pl.core.files import atomic_file

# Curves drawn in each panel: (history key, label).
TRAIN_REWARD_KEYS: tuple[tuple[str, str], ...] = (
    ("train/reward", "reward"),
    ("train/reward_format", "format"),
    ("train/reward_tag", "tag"),
    ("train/reward_behavior", "behaviour"),
)
KL_KEY = "train/kl"
VAL_KEYS: tuple[tuple[str, str], ...] = (
    ("val/safety_score", "safety score"),
    ("val/refusal_rate", "refusal rate"),
    ("val/compositional_safety_score", "compositional"),
    ("val/reward", "mean reward"),
)
# The held-out figures in two panels: the refusal rate (safe pairs refused: lower is better)
# apart from the rest (higher is better), so that a policy refusing everything, at 1.0 in both,
# does not draw one line over the other.
VAL_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "held-out (greedy): unsafe pairs refused, reward; higher is better",
        ("val/safety_score", "val/compositional_safety_score", "val/reward"),
    ),
    ("held-out (greedy): safe pairs refused; lower is better", ("val/refusal_rate",)),
)


@dataclass
class TrainingHistory:
    """Scalars over optimiser steps, as the report callback collects them.

    Attributes:
        train: one dict per training step: {"step": int, "train/reward": float, ...}.
        val: one dict per evaluation of the held-out split: {"step": int, "val/...": float}.
    """

    train: list[dict[str, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)

    def series(self, which: str, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key` in the `which` ("train"/"val") rows that have it."""
        rows = self.train if which == "train" else self.val
        points = [(row["step"], row[key]) for row in rows if _finite(row.get(key))]
        return [p[0] for p in points], [p[1] for p in points]

    def to_dict(self) -> dict[str, Any]:
        return {"train": list(self.train), "val": list(self.val)}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (shorter at the start); same length as input."""
    if window < 1:
        raise ValueError(f"moving_average window is {window}; expected >= 1")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# Line style and marker per curve: curves that coincide (e.g. all parts at 1.0) stay visible.
STYLES: tuple[tuple[str, str], ...] = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def build_figure(
    history: TrainingHistory,
    *,
    smoothing: int = 10,
    title: str = "SafeGRPO: training curves",
) -> Any:
    """The matplotlib figure of the curves over optimiser steps (see `plot_curves`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    figure, grid = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    axes = list(grid.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    reward_ax, kl_ax, *val_axes = axes
    train_keys = (*TRAIN_REWARD_KEYS, (KL_KEY, "KL"))
    for index, (key, label) in enumerate(train_keys):
        steps, values = history.series("train", key)
        if not steps:
            continue
        ax = kl_ax if key == KL_KEY else reward_ax
        colour = colours[index % len(colours)]
        line, marker = STYLES[index % len(STYLES)]
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        ax.plot(
            steps,
            moving_average(values, smoothing),
            color=colour,
            linestyle=line,
            marker=marker,
            markersize=4,
            markevery=max(1, len(steps) // 12),  # a few markers, however long the run
            linewidth=2,
            label=label,
        )
    reward_ax.set(
        title="train reward and its parts (sampled)", xlabel="optimiser step", ylim=(-0.03, 1.03)
    )
    kl_ax.set(title="KL to the reference (initial policy)", xlabel="optimiser step")
    labels = dict(VAL_KEYS)
    val_colours = colours[5:] + colours[:5]
    for ax, (panel_title, keys) in zip(val_axes, VAL_PANELS, strict=True):
        for index, key in enumerate(keys):
            steps, values = history.series("val", key)
            if not steps:
                continue
            position = [k for k, _ in VAL_KEYS].index(key)
            line, marker = STYLES[position % len(STYLES)]
            ax.plot(
                steps,
                values,
                linestyle=line,
                marker=marker,
                markersize=9 - 2.5 * index,  # hollow, each smaller: equal points nest, visibly
                markerfacecolor="none",
                markeredgewidth=1.5,
                color=val_colours[position % len(val_colours)],
                linewidth=2,
                label=labels[key],
            )
        ax.set(title=panel_title, xlabel="optimiser step", ylim=(-0.03, 1.03))
    # What thin and thick mean, as legend entries of their own.
    key_lines = [
        Line2D([], [], color="grey", alpha=0.3, linewidth=0.8, label="per step"),
        Line2D([], [], color="grey", linewidth=2, label=f"mean of {smoothing} steps"),
    ]
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            extra = key_lines if ax in (reward_ax, kl_ax) else []
            ax.legend(handles=handles + extra, loc="best", fontsize=9)
    figure.suptitle(title)
    return figure


def plot_curves(
    history: TrainingHistory,
    path: str | os.PathLike[str],
    *,
    smoothing: int = 10,
    title: str = "SafeGRPO: training curves",
) -> Path:
    """Draw the curves over optimiser steps into a PNG (matplotlib, Agg backend).

    Panels: train reward and its parts (thin: per step; thick: trailing mean of `smoothing`
    steps, each with its own line style and markers so coinciding curves stay visible), KL to
    the reference, the held-out safety score, compositional safety score and mean reward at
    each evaluation, and the held-out refusal rate in a panel of its own (`VAL_PANELS`). Step ticks are integers, the same optimiser-step numbers as
    `metrics.csv` and `summary.json`.
    """
    import matplotlib.pyplot as plt

    figure = build_figure(history, smoothing=smoothing, title=title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return out
