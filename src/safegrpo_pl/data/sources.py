"""Records from the hub, local files or save_to_disk folders, validated once before training.

Where data can come from (`load_raw(dataset)`), all through `datasets`:
- a hub id such as `XuankunRong/SafeTag-VL-3K` (or a local folder in a hub repository's
  layout), via `datasets.load_dataset(id)`;
- a local `.parquet`, `.jsonl`/`.json` or `.csv` file, via `load_dataset("parquet"|"json"|"csv",
  data_files=...)`; its image column may hold paths relative to the file, or bytes;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, via `load_from_disk`;
- `"demo"`: the built-in Pillow-drawn set of `safegrpo_pl.demo.dataset`.
Columns: `prompt`, `image_tag`, `text_tag`, `combine_tag`, and `image` or `images` (a list whose
first item is used, as in SafeTag-VL-3K); `id` and `source` are optional.

Every record is checked once (`validate_rows`: image decoded, tags, prompt, prompt length), so
bad input fails before training with an error naming the record, the field, what was found and
what was expected, never mid-epoch. `RowConverter` turns one raw row into a `SafetyRecord`; the
same converter decodes a record again when it is served (`safegrpo_pl.data.datamodule`).

Departures from the authors' pipeline:
- Too-long prompts are dropped and counted (docs/method.md section 4.11), but malformed records raise by default
  (`on_bad_record="raise"`); `"skip"` drops them, counted per kind and id (`BadRecordReport`).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import datasets

from safegrpo_pl.core.records import ImageDecodeError, SafetyRecord, decode_image, normalize_tag
from safegrpo_pl.demo.dataset import DemoConfig, make_demo_splits

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "image_tag", "text_tag", "combine_tag")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "images")
TAG_FIELDS: tuple[str, ...] = ("image_tag", "text_tag", "combine_tag")
BAD_RECORD_KINDS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "corrupt_image",
    "oversized_image",
    "bad_tag",
    "empty_prompt",
    "prompt_too_long",
    "duplicate_id",
)
FILE_BUILDERS: dict[str, str] = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
}
Rows = datasets.Dataset | Sequence[SafetyRecord]


class BadRecordError(ValueError):
    """One record failed validation; `kind` is one of `BAD_RECORD_KINDS`."""

    def __init__(self, message: str, *, kind: str, index: int, record_id: str, field: str) -> None:
        super().__init__(message)
        self.kind, self.index, self.record_id, self.field = kind, index, record_id, field


@dataclass
class BadRecordReport:
    """What validation dropped from one split, so that nothing leaves without being counted.

    Attributes:
        split: the name of the split in the source dataset.
        counts: kind (see `BAD_RECORD_KINDS`) -> number of records dropped for it.
        ids: kind -> the ids of those records.
    """

    split: str
    counts: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, error: BadRecordError) -> None:
        self.counts[error.kind] = self.counts.get(error.kind, 0) + 1
        self.ids.setdefault(error.kind, []).append(error.record_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = [
            f"{kind} {n} (ids: {', '.join(self.ids[kind][:10])}{', ...' if n > 10 else ''})"
            for kind, n in sorted(self.counts.items())
        ]
        return f"split {self.split!r}: dropped {self.total} records: " + "; ".join(parts)


# -- rows -> records --------------------------------------------------------------------------


@dataclass(frozen=True)
class RowConverter:
    """Turns one raw row (a dict, or an already built `SafetyRecord`) into a validated record.

    Attributes:
        dataset: the dataset's name, for error messages.
        split: the split's name in the source, for error messages and default ids.
        image_column: "image" or "images".
        base_dir: folder that relative image paths start from (the data file's folder).
        default_source: `source` of rows that have none.
    """

    dataset: str
    split: str
    image_column: str = "image"
    base_dir: Path | None = None
    default_source: str = ""

    def error(
        self, kind: str, index: int, rid: str, source: str, name: str, problem: str
    ) -> BadRecordError:
        """The error for field `name` of record `index`: where, what was found, what expected."""
        where = f"dataset {self.dataset!r} split {self.split!r} record {index}"
        locator = f"id={rid}, source={source or '?'}; records count from 0"
        message = f"{where} ({locator}): {name} {problem}"
        return BadRecordError(message, kind=kind, index=index, record_id=rid, field=name)

    def __call__(self, row: Mapping[str, Any] | SafetyRecord, index: int) -> SafetyRecord:
        """Validate `row` (number `index` in its split) and build the record; raises
        `BadRecordError` naming the record, field, value found and value expected."""
        image_column = self.image_column
        if isinstance(row, SafetyRecord):
            row, image_column = {f.name: getattr(row, f.name) for f in fields(row)}, "image"
        rid = str(row.get("id") or f"{self.split}-{index:05d}")
        source = str(row.get("source") or self.default_source)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            problem = f"is {prompt!r}; expected a non-empty instruction"
            raise self.error("empty_prompt", index, rid, source, "prompt", problem)
        tags = {name: normalize_tag(row.get(name)) for name in TAG_FIELDS}
        for name, tag in tags.items():
            if tag is None:
                value = row.get(name)
                found = (
                    "missing (empty or absent)" if value is None or value == "" else f"{value!r}"
                )
                problem = f"is {found}; expected 'safe' or 'unsafe' (any case)"
                raise self.error("bad_tag", index, rid, source, name, problem)
        try:
            image = decode_image(row.get(image_column), self.base_dir)
        except ImageDecodeError as err:
            problem = f"is {err.found}; expected a readable image"
            raise self.error(err.kind, index, rid, source, image_column, problem) from err
        caption = row.get("caption")  # optional column: what the image shows
        caption = caption.strip() if isinstance(caption, str) else ""
        novelty = row.get("novelty")  # optional column: how a held-out record is new
        novelty = novelty.strip() if isinstance(novelty, str) else ""
        return SafetyRecord(
            image=image,
            prompt=prompt,
            id=rid,
            source=source,
            caption=caption,
            novelty=novelty,
            **tags,
        )


def _iter_rows(rows: Rows, indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """(index, raw row) pairs; Arrow rows are read 256 at a time, one table slice per chunk."""
    if isinstance(rows, datasets.Dataset):
        table = rows.with_format("arrow")
        for start in range(0, len(indices), 256):
            chunk = indices[start : start + 256]
            yield from zip(chunk, table[list(chunk)].to_pylist(), strict=True)
    else:
        for index in indices:
            yield index, rows[index]


def check_columns(rows: Rows, dataset: str, split: str) -> str:
    """Fail on a missing column (naming it and the columns found); return the image column."""
    if not isinstance(rows, datasets.Dataset):
        return "image"
    found = rows.column_names
    image_column = next((c for c in IMAGE_COLUMNS if c in found), None)
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if image_column is None:
        missing.append("image (or images)")
    if missing:
        raise ValueError(
            f"dataset {dataset!r} split {split!r}: missing column(s) {missing}; columns found: "
            f"{found}; expected {list(REQUIRED_COLUMNS)} and 'image' or 'images'. Rename the "
            "columns (datasets' rename_column) or fix the file."
        )
    return image_column


def validate_rows(
    rows: Rows,
    indices: Sequence[int],
    converter: RowConverter,
    *,
    encoder: Any = None,
    max_prompt_length: int | None = None,
    on_bad_record: Literal["raise", "skip"] = "raise",
    on_long_prompt: Literal["raise", "skip"] = "skip",
) -> tuple[dict[int, str], BadRecordReport]:
    """Check every row of `indices` once; return {kept index: source} and what was dropped.

    `encoder.prompt_length(record)` (image tokens included) is compared with
    `max_prompt_length` when an encoder is given.
    """
    kept: dict[int, str] = {}
    first_with_id: dict[str, int] = {}
    report = BadRecordReport(split=converter.split)
    for index, row in _iter_rows(rows, indices):
        try:
            record = converter(row, index)
            if record.id in first_with_id:
                problem = (
                    f"is {record.id!r}, as record {first_with_id[record.id]}'s; expected an id "
                    "no other record of the split has (predictions and reports name records "
                    "by id): give each record its own, or drop the id column to have ids made "
                    "from the split and row number"
                )
                raise converter.error(
                    "duplicate_id", index, record.id, record.source, "id", problem
                )
            first_with_id[record.id] = index
            if encoder is not None and max_prompt_length is not None:
                length = encoder.prompt_length(record)
                if length > max_prompt_length:
                    problem = (
                        f"is {length} tokens long with the guide and image tokens; expected at "
                        f"most max_prompt_length={max_prompt_length}"
                    )
                    raise converter.error(
                        "prompt_too_long", index, record.id, record.source, "prompt", problem
                    )
        except BadRecordError as err:
            long_prompt = err.kind == "prompt_too_long"
            if (on_long_prompt if long_prompt else on_bad_record) == "raise":
                fix = (
                    "raise --data.max_prompt_length, or pass --data.on_long_prompt skip to drop "
                    "such records"
                    if long_prompt
                    else "fix the record, or pass --data.on_bad_record skip to drop such records"
                )
                raise BadRecordError(
                    f"{err}. To go on: {fix} (counted).",
                    kind=err.kind,
                    index=err.index,
                    record_id=err.record_id,
                    field=err.field,
                ) from err
            report.add(err)
            continue
        kept[index] = record.source
    if report.total:
        log.warning(report.summary())
    return kept, report


# -- opening a source -------------------------------------------------------------------------


@dataclass(frozen=True)
class RawData:
    """The splits of a source before validation, and where its relative paths start."""

    name: str
    splits: dict[str, Rows]
    base_dir: Path | None = None


def load_raw(
    dataset: str, *, demo: DemoConfig | None = None, cache_dir: str | None = None
) -> RawData:
    """Open `dataset` (see the module docstring for what it may be) without validating it."""
    if dataset == "demo":
        return RawData("demo", dict(make_demo_splits(demo or DemoConfig())))
    path = Path(dataset).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"dataset file {str(path)!r}: unsupported extension "
                f"{path.suffix!r}; expected one of {sorted(FILE_BUILDERS)}"
            )
        return RawData(path.stem, _load_file(path, builder, cache_dir), path.parent.resolve())
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return RawData(path.name, splits, path.resolve())
    try:
        loaded = datasets.load_dataset(dataset, cache_dir=cache_dir)
    except OSError as err:  # includes datasets' DatasetNotFoundError and ConnectionError
        raise FileNotFoundError(
            f"dataset {dataset!r} is not 'demo', a data file ({sorted(FILE_BUILDERS)}), a "
            f"save_to_disk folder, nor a reachable hub dataset: {err}"
        ) from err
    base = path.resolve() if path.is_dir() else None
    return RawData(dataset.rstrip("/").split("/")[-1], dict(loaded), base)


def _load_file(path: Path, builder: str, cache_dir: str | None) -> dict[str, Rows]:
    """The splits of a data file; an empty, non-UTF-8 or malformed file is a `ValueError`
    naming the file, the line and the fix, not `datasets`' traceback."""
    where = f"dataset file {str(path)!r}"
    with path.open("rb") as handle:
        head = handle.read(1 << 16)
    whole = len(head) == path.stat().st_size
    if whole and not head.strip():
        raise ValueError(
            f"{where} is empty; expected {FILE_SHAPES[builder]}. Fill it, or point "
            "--data.dataset at the file that holds the records."
        )
    if whole and builder == "csv" and len([x for x in head.splitlines() if x.strip()]) < 2:
        raise ValueError(f"{where} has a header and no records; expected {FILE_SHAPES['csv']}")
    try:
        loaded = dict(datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir))
    except Exception as err:  # datasets wraps the cause; find it and say it in words
        raise ValueError(f"{where}: {_why_unreadable(path, builder, err)}") from err
    if not any(len(rows) for rows in loaded.values()):
        raise ValueError(f"{where} holds no records; expected {FILE_SHAPES[builder]}")
    return loaded


FILE_SHAPES = {
    "json": "one JSON object per line (JSON Lines) with the columns prompt, image, image_tag, "
    "text_tag, combine_tag",
    "csv": "a header line (prompt,image,image_tag,text_tag,combine_tag) and one line per record",
    "parquet": "a parquet table with the columns prompt, image, image_tag, text_tag, combine_tag",
}


def _why_unreadable(path: Path, builder: str, err: BaseException) -> str:
    """What is wrong with a data file `datasets` could not read, in words, with the fix."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            return (
                f"not UTF-8 text (byte {cause.object[cause.start : cause.start + 1]!r} at "
                f"offset {cause.start}); save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
            )
        cause = cause.__cause__ or cause.__context__
    if builder == "json":
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as bad:
                return f"line {number} is not JSON ({bad.msg}); expected {FILE_SHAPES['json']}"
            if not isinstance(value, dict):
                found = type(value).__name__
                return f"line {number} is a JSON {found}; expected {FILE_SHAPES['json']}"
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot be read as {builder} ({reason}); expected {FILE_SHAPES[builder]}"


def seeded_split(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle `range(count)` with `seed` and hold out ceil(test_fraction * count) for test
    (at least one when count >= 2). Returns (train indices, test indices), each sorted."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = min(count - 1, max(1, math.ceil(test_fraction * count))) if count >= 2 else 0
    return sorted(order[held:]), sorted(order[:held])
