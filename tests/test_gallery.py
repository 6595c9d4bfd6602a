"""Held-out completions: which are kept, their rows, the JSONL file, logger tables, the gallery."""

from __future__ import annotations

import json
from types import SimpleNamespace

from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from safegrpo_pl.core.prompts import HELPFUL_ANSWERS, REFUSAL_ANSWERS, format_response
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import score_completions
from safegrpo_pl.run.gallery import (
    TABLE_COLUMNS,
    ExampleCollector,
    append_jsonl,
    examples_markdown,
    gallery_rows,
    log_completion_table,
)


def _record(i: int, source: str, tags=("unsafe", "safe", "unsafe")) -> SafetyRecord:
    image = Image.new("RGB", (112, 112), (i, 100, 100))
    return SafetyRecord(
        image, f"prompt {i}", *tags, id=f"r{i}", source=source, novelty="unseen-pair"
    )


def _answers(records, combined):
    texts = [
        format_response(
            visual=r.image_tag,
            text=r.text_tag,
            combined=combined,
            answer=REFUSAL_ANSWERS[0] if combined == "unsafe" else HELPFUL_ANSWERS[0],
        )
        for r in records
    ]
    tags = [[getattr(r, f) for r in records] for f in ("image_tag", "text_tag", "combine_tag")]
    return texts, score_completions(texts, *tags)


def test_collector_keeps_the_first_records_of_each_source_across_batches():
    records = [_record(i, "a" if i % 3 else "b") for i in range(9)]  # b: 0, 3, 6
    texts, parts = _answers(records, "unsafe")
    collector = ExampleCollector(per_source=2)
    collector.add(records[:4], texts[:4], parts[:4])
    collector.add(records[4:], texts[4:], parts[4:])
    assert [r.id for r, _, _ in collector.rows] == ["r0", "r1", "r2", "r3"]


def test_rows_carry_step_record_tags_response_and_reward_parts(tmp_path):
    records = [_record(0, "a"), _record(1, "a", ("safe", "safe", "safe"))]
    texts, parts = _answers(records, "unsafe")
    rows = gallery_rows(30, "validation", zip(records, texts, parts, strict=True))
    assert rows[0]["step"] == 30 and rows[0]["id"] == "r0" and rows[0]["source"] == "a"
    assert rows[0]["novelty"] == "unseen-pair" and rows[0]["response"] == texts[0]
    assert rows[0]["reward"]["total"] == 1.0, rows[0]["reward"]  # all right
    assert rows[1]["reward"]["combined_correct"] is False  # safe pair called unsafe
    assert rows[1]["tags"] == {"image": "safe", "text": "safe", "combined": "safe"}
    path = tmp_path / "run" / "completions.jsonl"
    append_jsonl(path, rows)
    append_jsonl(path, rows[:1])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in lines] == ["r0", "r1", "r0"], "not appended"


class _TableLogger:
    def __init__(self):
        self.calls = []

    def log_table(self, key, columns, data, step):
        self.calls.append((key, columns, data, step))


def test_tables_go_to_loggers_that_show_them_and_csv_is_skipped(tmp_path):
    records = [_record(0, "a")]
    texts, parts = _answers(records, "safe")
    rows = gallery_rows(5, "validation", zip(records, texts, parts, strict=True))
    table = _TableLogger()
    texts_seen = []
    board = SimpleNamespace(
        experiment=SimpleNamespace(add_text=lambda *a, **k: texts_seen.append(a))
    )
    csv = CSVLogger(tmp_path)
    shown = log_completion_table([table, board, csv], rows, step=5)
    assert shown == 2, "the CSV logger has no table and must be skipped, the others not"
    key, columns, data, step = table.calls[0]
    assert (key, step, columns) == ("val/completions", 5, list(TABLE_COLUMNS))
    assert data[0][columns.index("reward")] == 0.0  # combined tag wrong
    assert "| r0 |" in texts_seen[0][1]


def test_gallery_shows_thumbnail_instruction_and_both_responses(tmp_path):
    records = [_record(0, "typo"), _record(1, "typo")]
    before_texts, before_parts = _answers(records, "safe")
    after_texts, after_parts = _answers(records, "unsafe")
    lines = examples_markdown(
        list(zip(records[:1], before_texts, before_parts, strict=False)),
        list(zip(records, after_texts, after_parts, strict=True)),
        tmp_path,
    )
    row = next(line for line in lines if "examples/r0.png" in line)
    assert "prompt 0" in row and "unsafe/safe/unsafe" in row
    # the tags in a code span (raw, they would vanish as HTML), each response with its reward
    assert "`<think>" in row and "(reward 0.00)" in row and "(reward 1.00)" in row, row
    thumb = Image.open(tmp_path / "examples" / "r0.png")
    assert max(thumb.size) == 96, thumb.size
    row1 = next(line for line in lines if "examples/r1.png" in line)
    assert "| n/a |" in row1, "a record without a before response must say so"
