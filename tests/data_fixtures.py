"""Builders of small on-disk datasets for the data tests (helpers, not fixtures: conftest.py is
shared, so the data tests wrap these in their own fixtures)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from safegrpo_pl.core.records import SafetyRecord

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink")


def png_bytes(colour: str = "red", size: int = 32) -> bytes:
    """A small solid-colour PNG, as bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def tagged_rows(count: int) -> list[dict[str, Any]]:
    """`count` valid rows (without image), tags cycling so both values occur, mixed case."""
    rows = []
    for i in range(count):
        rows.append(
            {
                "id": f"row-{i:03d}",
                "prompt": f"Describe picture number {i}.",
                "image_tag": ("safe", "Unsafe")[i % 2],
                "text_tag": "SAFE",
                "combine_tag": ("safe", "unsafe")[i % 2],
            }
        )
    return rows


def hub_features() -> datasets.Features:
    """The column types of XuankunRong/SafeTag-VL-3K (an `images` list with one image)."""
    text = datasets.Value("string")
    return datasets.Features(
        {
            "prompt": text,
            "images": datasets.List(datasets.Image()),
            "image_tag": text,
            "text_tag": text,
            "combine_tag": text,
        }
    )


def hub_split(count: int, offset: int = 0) -> datasets.Dataset:
    """A split in the hub schema, images as PNG bytes."""
    rows = tagged_rows(count + offset)[offset:]
    columns = {
        "prompt": [r["prompt"] for r in rows],
        "images": [[{"bytes": png_bytes(COLOURS[i % 10]), "path": None}] for i in range(count)],
        "image_tag": [r["image_tag"] for r in rows],
        "text_tag": [r["text_tag"] for r in rows],
        "combine_tag": [r["combine_tag"] for r in rows],
    }
    return datasets.Dataset.from_dict(columns, features=hub_features())


def write_hub_layout(root: Path, train: int = 6, test: int = 3) -> Path:
    """A folder laid out like a hub dataset repository: data/{train,test}-00000-of-00001.parquet."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    hub_split(train).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    hub_split(test, offset=train).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def write_image_files(root: Path, count: int) -> list[str]:
    """Write images/NNN.png under `root`; return their paths relative to `root`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        name = f"images/{i:03d}.png"
        (root / name).write_bytes(png_bytes(COLOURS[i % 10]))
        names.append(name)
    return names


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_local_jsonl(root: Path, count: int = 10) -> Path:
    """A data.jsonl whose `image` column holds paths relative to the file."""
    rows = tagged_rows(count)
    for row, name in zip(rows, write_image_files(root, count), strict=True):
        row["image"] = name
        row["source"] = "local"
    return write_jsonl(root / "data.jsonl", rows)


class WordCountEncoder:
    """Stands in for `PromptEncoder` where only lengths and collation matter.

    `prompt_length` = words in the prompt + 10 (a fixed "template + image" overhead), so a
    test can compute it by hand; calling it returns the records (a collate function).
    """

    overhead = 10

    def prompt_length(self, record: SafetyRecord) -> int:
        return len(record.prompt.split()) + self.overhead

    def __call__(self, records: Sequence[SafetyRecord]) -> list[SafetyRecord]:
        return list(records)
