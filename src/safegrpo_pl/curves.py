"""The curves over optimiser steps: the history the report callback collects, and its figure.

`TrainingHistory` holds the logged scalars per training step and per held-out evaluation;
`plot_curves` draws them into `curves.png` (see `safegrpo_pl.report.write_report`): train
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


def plot_curves(
    history: TrainingHistory,
    path: str | os.PathLike[str],
    *,
    smoothing: int = 10,
    title: str = "SafeGRPO: training curves",
) -> Path:
    """Draw the curves over optimiser steps into a PNG (matplotlib, Agg backend).

    Panels: train reward and its parts (thin: per step; thick: trailing mean of `smoothing`
    steps), KL to the reference, and the held-out safety score, refusal rate, compositional
    safety score and mean reward at each evaluation.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 4.6), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    reward_ax, kl_ax, val_ax = axes
    for (key, label), colour in zip(TRAIN_REWARD_KEYS, colours, strict=False):
        steps, values = history.series("train", key)
        if not steps:
            continue
        reward_ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        reward_ax.plot(
            steps, moving_average(values, smoothing), color=colour, linewidth=2, label=label
        )
    reward_ax.set(
        title="train reward and its parts (sampled)", xlabel="optimiser step", ylim=(-0.03, 1.03)
    )
    steps, values = history.series("train", KL_KEY)
    if steps:
        kl_ax.plot(steps, values, color=colours[4], alpha=0.3, linewidth=0.8)
        kl_ax.plot(
            steps, moving_average(values, smoothing), color=colours[4], linewidth=2, label="KL (k3)"
        )
    kl_ax.set(title="KL to the reference (initial policy)", xlabel="optimiser step")
    # Distinct line styles and markers: curves that coincide (e.g. all at 100%) stay visible.
    styles = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
    for (key, label), colour, (line, marker) in zip(
        VAL_KEYS, colours[5:] + colours[:5], styles, strict=False
    ):
        steps, values = history.series("val", key)
        if steps:
            val_ax.plot(
                steps,
                values,
                linestyle=line,
                marker=marker,
                markersize=4,
                color=colour,
                linewidth=2,
                label=label,
            )
    val_ax.set(title="held-out split (greedy)", xlabel="optimiser step", ylim=(-0.03, 1.03))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=9)
    figure.suptitle(title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
