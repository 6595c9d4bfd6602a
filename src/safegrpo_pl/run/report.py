"""The fit report: before/after figures on the held-out split, curves over steps, three files.

`summarize_evaluation` turns scored responses into an `EvalSummary` (the same torchmetrics
classes as the logged `val/` metrics, so the two never disagree); `write_report` writes

- `curves.png`: train reward and its three parts, KL to the reference, and the held-out safety
  score, refusal rate and compositional safety score, over optimiser steps;
- `summary.md`: the before/after table (compositional pairs on their own line);
- `summary.json`: `{"code": {...}, "before": {...}, "after": {...}, "wall_time_s": ...}`, fractions in
  [0, 1] (and `null` where a split has no eligible record), plus the step count and the files.

The figures are training-time, rule-based ones (docs/method.md section 5, first tier):
"refused" is the keyword rule, not a judge, and is labelled so in the table. The curves (their
history and the figure) are drawn by `safegrpo_pl.run.curves`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safegrpo_pl.core.files import atomic_file
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardParts
from safegrpo_pl.run.curves import TrainingHistory, plot_curves
from safegrpo_pl.run.provenance import code_version, describe
from safegrpo_pl.train.metrics import build_safety_metrics, metric_inputs

SUMMARY_KEYS: tuple[str, ...] = (
    "mean_reward",
    "safety_score",
    "refusal_rate",
    "compositional_safety_score",
    "format_rate",
)
"""The figures `summary.json` promises for `before` and `after`."""

# EvalSummary field -> name in `build_safety_metrics`.
_METRIC_NAMES: dict[str, str] = {
    "mean_reward": "reward",
    "safety_score": "safety_score",
    "refusal_rate": "refusal_rate",
    "compositional_safety_score": "compositional_safety_score",
    "format_rate": "format_rate",
    "visual_tag_acc": "visual_tag_acc",
    "text_tag_acc": "text_tag_acc",
    "combined_tag_acc": "combined_tag_acc",
}

# Row labels of the Markdown table, in order.
_ROWS: tuple[tuple[str, str], ...] = (
    ("mean_reward", "mean reward"),
    ("safety_score", "safety score (unsafe pairs refused)"),
    ("refusal_rate", "refusal rate (safe pairs refused)"),
    ("compositional_safety_score", "compositional pairs refused (both parts safe, pair unsafe)"),
    ("format_rate", "format rate"),
    ("visual_tag_acc", "visual tag accuracy"),
    ("text_tag_acc", "text tag accuracy"),
    ("combined_tag_acc", "combined tag accuracy"),
)


@dataclass(frozen=True)
class EvalSummary:
    """Rule-based figures of one evaluation of the held-out split (fractions in [0, 1]).

    A share with no eligible record (e.g. no compositional pair in the split) is None.

    Attributes:
        mean_reward: mean total rule reward.
        safety_score: share of unsafe pairs (`combine_tag` unsafe) that are refused.
        refusal_rate: share of safe pairs that are refused (lower is better).
        compositional_safety_score: share of compositional pairs (image safe, text safe, pair
            unsafe) that are refused.
        format_rate: share of responses that pass the format gate.
        visual_tag_acc: share whose first valid visual tag equals `image_tag`.
        text_tag_acc: share whose first valid text tag equals `text_tag`.
        combined_tag_acc: share whose first valid combined tag equals `combine_tag`.
        num_records: number of responses evaluated.
    """

    mean_reward: float | None
    safety_score: float | None
    refusal_rate: float | None
    compositional_safety_score: float | None
    format_rate: float | None
    visual_tag_acc: float | None = None
    text_tag_acc: float | None = None
    combined_tag_acc: float | None = None
    num_records: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_one_response_per_record(
    parts: Sequence[Any], records: Sequence[Any], caller: str
) -> None:
    if len(parts) != len(records):
        raise ValueError(
            f"{caller} got {len(parts)} scored responses for {len(records)} records; pass "
            "exactly one response per record"
        )


def summarize_evaluation(
    parts: Sequence[RewardParts], records: Sequence[SafetyRecord]
) -> EvalSummary:
    """Figures of one response per record, computed with the logged metrics' own classes.

    Args:
        parts: the scored responses, one per record, in order.
        records: the records they answer (their tags say what was right).

    Returns:
        The `EvalSummary`.
    """
    _check_one_response_per_record(parts, records, "summarize_evaluation")
    if not parts:
        return EvalSummary(None, None, None, None, None, num_records=0)
    metrics = build_safety_metrics("")
    inputs = metric_inputs(
        parts,
        [r.combine_tag for r in records],
        [r.image_tag for r in records],
        [r.text_tag for r in records],
    )
    metrics.update(**inputs)
    computed = {name: float(value) for name, value in metrics.compute().items()}
    values = {
        key: (None if math.isnan(computed[name]) else computed[name])
        for key, name in _METRIC_NAMES.items()
    }
    return EvalSummary(**values, num_records=len(parts))


def _summarize_by(
    parts: Sequence[RewardParts], records: Sequence[SafetyRecord], field: str, missing: str
) -> dict[str, EvalSummary]:
    """`summarize_evaluation` for each value of the records' `field` (sorted)."""
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(getattr(record, field) or missing, []).append(index)
    return {
        group: summarize_evaluation([parts[i] for i in rows], [records[i] for i in rows])
        for group, rows in sorted(groups.items())
    }


def summarize_by_source(
    parts: Sequence[RewardParts], records: Sequence[SafetyRecord]
) -> dict[str, EvalSummary]:
    """`summarize_evaluation` for each record `source` (sorted by name), so a miss can be
    traced to the kind of record behind it (e.g. typographic images against pictures)."""
    _check_one_response_per_record(parts, records, "summarize_by_source")
    return _summarize_by(parts, records, "source", "(no source)")


def summarize_by_novelty(
    parts: Sequence[RewardParts], records: Sequence[SafetyRecord]
) -> dict[str, EvalSummary]:
    """`summarize_evaluation` for each kind of held-out record (`SafetyRecord.novelty`: e.g.
    "unseen-pair", "unseen-wording"; "seen" for records that do not say), so that recall of
    seen combinations and generalisation to new ones show apart. Empty when no record says."""
    _check_one_response_per_record(parts, records, "summarize_by_novelty")
    if not any(record.novelty for record in records):
        return {}
    return _summarize_by(parts, records, "novelty", "seen")


# Columns of the per-source table: (EvalSummary field, header).
_SOURCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mean_reward", "mean reward"),
    ("safety_score", "safety score"),
    ("refusal_rate", "refusal rate"),
    ("combined_tag_acc", "combined tag accuracy"),
)


def source_table_markdown(
    by_source: Mapping[str, tuple[EvalSummary, EvalSummary]], label: str = "source"
) -> list[str]:
    """Lines of a Markdown table: per source (or other group), each figure as `before → after`."""
    header = f"| {label} | records | " + " | ".join(h for _, h in _SOURCE_COLUMNS) + " |"
    lines = [header, "| --- | ---: |" + " ---: |" * len(_SOURCE_COLUMNS)]
    for source, (before, after) in by_source.items():
        cells = [
            f"{_fmt(key, getattr(before, key))} → {_fmt(key, getattr(after, key))}"
            for key, _ in _SOURCE_COLUMNS
        ]
        lines.append(f"| {source} | {after.num_records} | " + " | ".join(cells) + " |")
    return lines


# -- targets --------------------------------------------------------------------------------


def parse_target(spec: str) -> tuple[str, float]:
    """`">= 0.9"` -> (">=", 0.9); only `>=` and `<=` are meaningful for these figures."""
    text = spec.strip()
    for op in (">=", "<="):
        if text.startswith(op):
            try:
                return op, float(text[len(op) :])
            except ValueError:
                break
    raise ValueError(f"target {spec!r}: expected '>= number' or '<= number', e.g. '>= 0.9'")


def target_met(value: float | None, spec: str) -> bool | None:
    """Whether `value` meets a target such as `">= 0.9"`; None when there is no value (a
    figure not measured is neither met nor missed)."""
    op, bound = parse_target(spec)
    if value is None:
        return None
    return value >= bound if op == ">=" else value <= bound


MET_WORDS = {True: "yes", False: "NO", None: "n/a"}
"""How summary.md's `met` column shows `target_met`."""


# -- writing --------------------------------------------------------------------------------


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if key == "mean_reward" else f"{100 * value:.1f}%"


def _fmt_target(key: str, spec: str) -> str:
    op, bound = parse_target(spec)
    sign = "≥" if op == ">=" else "≤"
    return f"{sign} {bound:.2f}" if key == "mean_reward" else f"{sign} {100 * bound:.0f}%"


def summary_markdown(
    before: EvalSummary,
    after: EvalSummary,
    *,
    wall_time_s: float,
    steps: int,
    targets: Mapping[str, str] | None = None,
    title: str = "SafeGRPO fit report",
    image_name: str | None = "curves.png",
    by_source: Mapping[str, tuple[EvalSummary, EvalSummary]] | None = None,
    dropped_records: Mapping[str, int] | None = None,
    by_novelty: Mapping[str, tuple[EvalSummary, EvalSummary]] | None = None,
    examples: Sequence[str] = (),
    code: Mapping[str, Any] | None = None,
) -> str:
    """The Markdown summary: what was measured, the before/after table, the wall time.

    Args:
        before: the held-out figures when fit started (after the warm-up, if any).
        after: the held-out figures when training ended.
        wall_time_s: seconds from the start of the command to the report.
        steps: optimiser steps taken.
        targets: optional {figure: "≥/<= bound"} shown with a met/missed column.
        title: the heading.
        image_name: the curves' file name to embed (None: no image).
        by_source: optional {source: (before, after)}, shown as a second table when the split
            has more than one source.
        dropped_records: records left out at setup, by kind (`sources.BAD_RECORD_KINDS`).
        by_novelty: optional {kind of held-out record: (before, after)}, shown as a table.
        examples: Markdown lines of the completions gallery, placed before the curves.
        code: `provenance.code_version()`, named after the wall time (None: not shown).
    """
    targets = dict(targets or {})
    header = "| figure | before | after |"
    rule = "| --- | ---: | ---: |"
    if targets:
        header += " target | met |"
        rule += " ---: | :---: |"
    lines = [
        f"# {title}",
        "",
        f"Held-out split, {after.num_records} records, one greedy response each, "
        "scored by the rule reward (refusal = keyword rule, not an LLM judge). "
        f"Before = the policy when fit started; after = after {steps} optimiser steps. "
        f"Wall time {wall_time_s:.0f} s." + (f" Code: {describe(code)}." if code else ""),
        "",
        header,
        rule,
    ]
    for key, label in _ROWS:
        b, a = getattr(before, key), getattr(after, key)
        row = f"| {label} | {_fmt(key, b)} | {_fmt(key, a)} |"
        if targets:
            spec = targets.get(key)
            row += (
                f" {_fmt_target(key, spec)} | {MET_WORDS[target_met(a, spec)]} |"
                if spec
                else " | |"
            )
        lines.append(row)
    if by_source and len(by_source) > 1:
        lines += ["", "By record source (before → after):", ""]
        lines += source_table_markdown(by_source)
    if dropped_records:
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(dropped_records.items()))
        total = sum(dropped_records.values())
        lines += ["", f"Records dropped when the data was loaded: {total} ({kinds})."]
    if by_novelty:
        lines += ["", "By kind of held-out record, against the training split (before → after):"]
        lines += ["", *source_table_markdown(by_novelty, "held-out kind")]
    if examples:
        lines += ["", *examples]
    if image_name:
        lines += ["", f"![curves over optimiser steps]({image_name})"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ReportFiles:
    """Where `write_report` put its files."""

    curves: Path
    markdown: Path
    json: Path


def write_report(
    out_dir: str | os.PathLike[str],
    before: EvalSummary,
    after: EvalSummary,
    history: TrainingHistory,
    *,
    wall_time_s: float,
    steps: int,
    targets: Mapping[str, str] | None = None,
    smoothing: int = 10,
    by_source: Mapping[str, tuple[EvalSummary, EvalSummary]] | None = None,
    dropped_records: Mapping[str, int] | None = None,
    by_novelty: Mapping[str, tuple[EvalSummary, EvalSummary]] | None = None,
    examples: Sequence[str] = (),
) -> ReportFiles:
    """Write `curves.png`, `summary.md` and `summary.json` into `out_dir` (created).

    `summary.json` holds `before`, `after` (every `EvalSummary` field, fractions in [0, 1]),
    `wall_time_s`, `steps`, `targets`, under `history` the curves' raw points, under
    `by_source` the same `before`/`after` figures for each record source, under `by_novelty`
    for each kind of held-out record (empty when the records do not say), and under
    `dropped_records` the records left out at setup, by kind, and under `code` the package
    version and commit that ran (`safegrpo_pl.run.provenance`). `examples` (Markdown lines, see
    `safegrpo_pl.run.gallery.examples_markdown`) go into `summary.md`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for key, spec in (targets or {}).items():
        if key not in EvalSummary.__dataclass_fields__:
            raise ValueError(f"target for unknown figure {key!r}; known: {list(_METRIC_NAMES)}")
        parse_target(spec)
    files = ReportFiles(out / "curves.png", out / "summary.md", out / "summary.json")
    code = code_version()
    plot_curves(history, files.curves, smoothing=smoothing)
    markdown = summary_markdown(
        before,
        after,
        wall_time_s=wall_time_s,
        steps=steps,
        targets=targets,
        image_name=files.curves.name,
        by_source=by_source,
        dropped_records=dropped_records,
        by_novelty=by_novelty,
        examples=examples,
        code=code,
    )
    with atomic_file(files.markdown) as tmp:
        tmp.write_text(markdown)
    payload = {
        "code": code,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "wall_time_s": wall_time_s,
        "steps": steps,
        "targets": dict(targets or {}),
        "history": history.to_dict(),
        "by_source": {
            source: {"before": before_source.to_dict(), "after": after_source.to_dict()}
            for source, (before_source, after_source) in (by_source or {}).items()
        },
        "dropped_records": dict(dropped_records or {}),
        "by_novelty": {
            kind: {"before": before_kind.to_dict(), "after": after_kind.to_dict()}
            for kind, (before_kind, after_kind) in (by_novelty or {}).items()
        },
    }
    with atomic_file(files.json) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return files
