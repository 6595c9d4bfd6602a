"""What the model says: a few held-out completions per source, as rows, a file, a table, a page.

Figures alone do not show what a model learned; a reader wants to see responses. The report
callback (`safegrpo_pl.run.callbacks.SafetyReport`) keeps, at each evaluation of the held-out
split, the first `per_source` records of each source (the same records every time, so one can
follow them over training) and

- appends their rows to `completions.jsonl` in the run folder (`append_jsonl`);
- sends them to the loggers that can show a table (`log_completion_table`; W&B's
  `log_table`, TensorBoard's text panel; the CSV logger cannot, and is skipped quietly);
- at the end, shows them in `summary.md` beside a thumbnail of the image, at the end of the
  warm-up and after GRPO, with their rewards (`examples_markdown`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardParts

TABLE_COLUMNS: tuple[str, ...] = (
    "step",
    "when",
    "id",
    "source",
    "novelty",
    "prompt",
    "tags",
    "response",
    "reward",
)
"""Columns of the logger table (the JSONL rows hold the reward's parts too)."""


class ExampleCollector:
    """Keeps the first `per_source` (record, response, reward) of each source, batch by batch.

    Args:
        per_source: records kept per source (0 keeps none).
    """

    def __init__(self, per_source: int) -> None:
        self.per_source = per_source
        self.rows: list[tuple[SafetyRecord, str, RewardParts]] = []
        self._counts: dict[str, int] = {}

    def add(
        self,
        records: Sequence[SafetyRecord],
        texts: Sequence[str],
        parts: Sequence[RewardParts],
    ) -> None:
        """Offer one batch's records, responses and rewards (aligned); keeps what fits."""
        for record, text, part in zip(records, texts, parts, strict=True):
            count = self._counts.get(record.source, 0)
            if count < self.per_source:
                self._counts[record.source] = count + 1
                self.rows.append((record, text, part))


def gallery_rows(
    step: int, when: str, kept: Iterable[tuple[SafetyRecord, str, RewardParts]]
) -> list[dict[str, Any]]:
    """One plain dict per kept completion: where in training, which record, what it said.

    Args:
        step: the optimiser step of the evaluation.
        when: "before" (the policy when fit started: the end of the warm-up), "validation"
            or "after" (when training ended).
        kept: (record, response, reward parts) triples.
    """
    return [
        {
            "step": step,
            "when": when,
            "id": record.id,
            "source": record.source,
            "novelty": record.novelty,
            "prompt": record.prompt,
            "tags": {
                "image": record.image_tag,
                "text": record.text_tag,
                "combined": record.combine_tag,
            },
            "response": text,
            "reward": asdict(part),
        }
        for record, text, part in kept
    ]


def append_jsonl(path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]]) -> None:
    """Append `rows` to the JSON-lines file `path` (its folder is created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _table_cell(row: Mapping[str, Any], column: str) -> Any:
    if column == "tags":
        return "/".join(row["tags"].values())
    if column == "reward":
        return round(float(row["reward"]["total"]), 3)
    return row[column]


def log_completion_table(
    loggers: Iterable[Any], rows: Sequence[Mapping[str, Any]], step: int
) -> int:
    """Send `rows` as a table to each logger that can show one; returns how many did.

    A logger with `log_table` (W&B) gets a table; one whose experiment has `add_text`
    (TensorBoard) gets it as Markdown. Others (CSV) are skipped: they have no place for it.
    """
    if not rows:
        return 0
    data = [[_table_cell(row, c) for c in TABLE_COLUMNS] for row in rows]
    shown = 0
    for logger in loggers:
        if callable(getattr(logger, "log_table", None)):
            logger.log_table(
                key="val/completions", columns=list(TABLE_COLUMNS), data=data, step=step
            )
            shown += 1
            continue
        experiment = getattr(logger, "experiment", None)
        if callable(getattr(experiment, "add_text", None)):
            lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
            lines += ["| " + " | ".join(_md(str(v)) for v in values) + " |" for values in data]
            experiment.add_text("val/completions", "\n".join(lines), global_step=step)
            shown += 1
    return shown


# -- the report's gallery -------------------------------------------------------------------


def _md(text: str) -> str:
    """`text` as a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """A code span, so that the response's `<think>` tags show instead of vanishing as HTML."""
    body = _md(text).replace("`", "'")
    return f"`{body}`" if body else "(empty)"


def save_thumbnail(image: Image.Image, path: Path, size: int = 96) -> None:
    """Save `image` at most `size` px on a side (nearest neighbour: text stays legible)."""
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    thumb.save(path)


def _response_cell(found: tuple[str, RewardParts] | None) -> str:
    if found is None:
        return "n/a"
    text, part = found
    return f"{_code(text)} (reward {part.total:.2f})"


def examples_markdown(
    before: Sequence[tuple[SafetyRecord, str, RewardParts]],
    after: Sequence[tuple[SafetyRecord, str, RewardParts]],
    out_dir: Path,
    folder: str = "examples",
) -> list[str]:
    """Markdown lines of the gallery; writes a thumbnail per record into `out_dir / folder`.

    Rows follow `after`'s records; `before` is matched to them by record id.
    """
    if not after:
        return []
    earlier = {record.id: (text, part) for record, text, part in before}
    lines = [
        "## What the model says",
        "",
        "A few held-out records per source, one greedy response each, at the end of the "
        "warm-up (before GRPO) and after GRPO, with the total rule reward.",
        "",
        "| image | record | instruction | tags (image/text/pair) | end of warm-up | after GRPO |",
        "| :---: | --- | --- | --- | --- | --- |",
    ]
    for record, text, part in after:
        name = f"{folder}/{record.id or len(lines)}.png"
        cell = "(no image)"
        if record.image is not None:
            save_thumbnail(record.image, out_dir / name)
            cell = f"![{record.source}]({name})"
        where = f"{record.source}" + (f" ({record.novelty})" if record.novelty else "")
        tags = f"{record.image_tag}/{record.text_tag}/{record.combine_tag}"
        lines.append(
            f"| {cell} | {_md(record.id)}<br>{_md(where)} | {_md(record.prompt)} | {tags} | "
            f"{_response_cell(earlier.get(record.id))} | {_response_cell((text, part))} |"
        )
    return lines
