"""Loading SafeTag-VL-style data, validating it at setup, and serving it: `SafeTagDataModule`.

Where data can come from (`dataset=`), all through `datasets`:
- a hub id such as `XuankunRong/SafeTag-VL-3K` (or a local folder in a hub repository's
  layout), via `datasets.load_dataset(id)`;
- a local `.parquet`, `.jsonl`/`.json` or `.csv` file, via `load_dataset("parquet"|"json"|"csv",
  data_files=...)`; its image column may hold paths relative to the file, or bytes;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, via `load_from_disk`;
- `"demo"`: the built-in Pillow-drawn set of `safegrpo_pl.demo_data`.
Columns: `prompt`, `image_tag`, `text_tag`, `combine_tag`, and `image` or `images` (a list whose
first item is used, as in SafeTag-VL-3K); `id` and `source` are optional.

Every record is checked once at setup (image decoded, tags, prompt, prompt length), so bad input
fails before training with an error naming the record, the field, what was found and what was
expected, never mid-epoch. Images are decoded again when a record is served rather than kept
decoded, so a real dataset costs its Arrow file (memory-mapped), not gigabytes of pixels.

Splits: train, validation, test. SPEC validates on the test split, so without a validation
split the test split serves as both; a dataset with a single split is split with a seed.
Under DDP each process loads the data and Lightning shards the (plain, map-style) loaders by
injecting a `DistributedSampler` (`Trainer(use_distributed_sampler=True)`, its default).

Departures from the authors' pipeline:
- Too-long prompts are dropped and counted at setup (SPEC), but malformed records raise by
  default (`on_bad_record="raise"`); `"skip"` drops them, counted per kind and id.
- `max_records` keeps a seeded random subset per split (for quick runs), not the first rows.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from safegrpo_pl.demo_data import DemoConfig, make_demo_splits
from safegrpo_pl.prompts import DEFAULT_SAFETY_GUIDE
from safegrpo_pl.records import ImageDecodeError, SafetyRecord, decode_image, normalize_tag

log = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "image_tag", "text_tag", "combine_tag")
IMAGE_COLUMNS: tuple[str, ...] = ("image", "images")
TAG_FIELDS: tuple[str, ...] = ("image_tag", "text_tag", "combine_tag")
BAD_RECORD_KINDS: tuple[str, ...] = (
    "missing_image",
    "unreadable_image",
    "corrupt_image",
    "bad_tag",
    "empty_prompt",
    "prompt_too_long",
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
        message = f"{where} (id={rid}, source={source or '?'}): {name} {problem}"
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
                problem = f"is {row.get(name)!r}; expected 'safe' or 'unsafe' (any case)"
                raise self.error("bad_tag", index, rid, source, name, problem)
        try:
            image = decode_image(row.get(image_column), self.base_dir)
        except ImageDecodeError as err:
            problem = f"is {err.found}; expected a readable image"
            raise self.error(err.kind, index, rid, source, image_column, problem) from err
        return SafetyRecord(image=image, prompt=prompt, id=rid, source=source, **tags)


class SafetyDataset(Dataset):
    """Map-style dataset of validated records: raw rows plus the indices that passed setup.

    Rows from `datasets` stay in their (memory-mapped) Arrow table and are decoded per item;
    rows that are already records (the demo) are served as they are. Picklable, for workers.
    """

    def __init__(self, rows: Rows, indices: Sequence[int], converter: RowConverter) -> None:
        self.rows = rows.with_format("arrow") if isinstance(rows, datasets.Dataset) else rows
        self.indices = list(indices)
        self.converter = converter

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> SafetyRecord:
        index = self.indices[item]
        row = self.rows[index]
        if isinstance(self.rows, datasets.Dataset):
            row = row.to_pylist()[0]
        return self.converter(row, index)


def _iter_rows(rows: Rows, indices: Sequence[int]) -> Iterator[tuple[int, Any]]:
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
    report = BadRecordReport(split=converter.split)
    for index, row in _iter_rows(rows, indices):
        try:
            record = converter(row, index)
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
                    "raise max_prompt_length, or pass on_long_prompt='skip' to drop such records"
                    if long_prompt
                    else "fix the record, or pass on_bad_record='skip' to drop such records"
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


# -- sources ----------------------------------------------------------------------------------


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
        loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        return RawData(path.stem, dict(loaded), path.parent.resolve())
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


def seeded_split(count: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle `range(count)` with `seed` and hold out ceil(test_fraction * count) for test
    (at least one when count >= 2). Returns (train indices, test indices), each sorted."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = min(count - 1, max(1, math.ceil(test_fraction * count))) if count >= 2 else 0
    return sorted(order[held:]), sorted(order[:held])


# -- the DataModule ---------------------------------------------------------------------------


def collate_records(records: Sequence[SafetyRecord]) -> list[SafetyRecord]:
    """The collate function without a processor: the batch is the list of records."""
    return list(records)


class SafeTagDataModule(LightningDataModule):
    """Train / validation / test / predict loaders of SafeTag-style records.

    Args:
        dataset: "demo", a hub id (e.g. "XuankunRong/SafeTag-VL-3K"), a .parquet/.jsonl/.csv
            file, or a save_to_disk folder.
        processor: model name or path whose tokenizer and image processor encode the prompts
            (the CLI links it to the model's path); None serves plain lists of records and
            skips the prompt-length check.
        guide: the step-guided safety guide appended to each instruction; None for none.
        batch_size: prompts per training batch (a rollout batch: each gets G completions).
        eval_batch_size: prompts per validation/test/predict batch; None: batch_size.
        num_workers: DataLoader worker processes (images are decoded in them).
        max_records: keep a seeded random subset of at most this many records per split.
        max_prompt_length: longest prompt in tokens, image tokens included (SPEC: 2048).
        on_bad_record: "raise" on the first malformed record, or "skip" it (counted, logged).
        on_long_prompt: "skip" (SPEC: dropped at setup and counted) or "raise".
        seed: seed of the split of a single-split dataset and of `max_records` sampling.
        test_fraction: share held out for test when the dataset has a single split.
        train_split: name of the training split.
        val_split: name of the validation split; None: "validation" if present, else the test
            split (SPEC validates on the test split).
        test_split: name of the test split (also served by the predict loader).
        demo: size and seed of the built-in demo set (used when dataset="demo").
        cache_dir: where `datasets` caches downloads and converted files; None: its default.
        trust_remote_code: run code shipped with the processor's checkpoint (the CLI links it
            to the model's setting); off unless you opt in.
    """

    def __init__(
        self,
        dataset: str = "demo",
        processor: str | None = None,
        guide: str | None = DEFAULT_SAFETY_GUIDE,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_records: int | None = None,
        max_prompt_length: int = 2048,
        on_bad_record: Literal["raise", "skip"] = "raise",
        on_long_prompt: Literal["raise", "skip"] = "skip",
        seed: int = 0,
        test_fraction: float = 0.1,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str = "test",
        demo: DemoConfig = DemoConfig(),  # noqa: B008 - frozen, so a shared default is safe
        cache_dir: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if on_bad_record not in ("raise", "skip") or on_long_prompt not in ("raise", "skip"):
            raise ValueError(
                f"on_bad_record / on_long_prompt are {on_bad_record!r} / "
                f"{on_long_prompt!r}; expected 'raise' or 'skip'"
            )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"batch_size {batch_size} / eval_batch_size {eval_batch_size}: expected at least 1"
            )
        self.save_hyperparameters(logger=False)
        # Again as plain data: `torch.load(weights_only=True)` refuses dataclass instances.
        self.save_hyperparameters(
            {
                k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for k, v in self.hparams.items()
            },
            logger=False,
        )
        self.dataset, self.processor, self.guide = dataset, processor, guide
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.max_records = num_workers, max_records
        self.max_prompt_length = max_prompt_length
        self.seed, self.test_fraction = seed, test_fraction
        self.on_bad_record, self.on_long_prompt = on_bad_record, on_long_prompt
        self.split_names = {"train": train_split, "validation": val_split, "test": test_split}
        self.demo, self.cache_dir = demo, cache_dir
        self.trust_remote_code = trust_remote_code
        self.encoder: Any = None
        self.datasets: dict[str, SafetyDataset] = {}
        self.bad_records: dict[str, BadRecordReport] = {}
        self.source_counts: dict[str, dict[str, int]] = {}

    def prepare_data(self) -> None:
        """Download a hub dataset once (rank 0); files and the demo need nothing."""
        if self.dataset != "demo" and not Path(self.dataset).expanduser().exists():
            load_raw(self.dataset, cache_dir=self.cache_dir)

    def _plan(self, raw: RawData) -> dict[str, tuple[str, list[int]]]:
        """Logical split -> (source split name, candidate row indices)."""
        names, wanted = list(raw.splits), self.split_names
        if len(names) == 1:
            only = names[0]
            train, test = seeded_split(len(raw.splits[only]), self.test_fraction, self.seed)
            log.info(
                "dataset %s has one split (%r): seeded %d/%d train/test split, validating on test",
                raw.name,
                only,
                len(train),
                len(test),
            )
            plan = {"train": (only, train), "test": (only, test)}
        else:
            for role in ("train", "test"):
                if wanted[role] not in raw.splits:
                    raise ValueError(
                        f"dataset {raw.name!r} has no {role} split "
                        f"{wanted[role]!r}; splits found: {names}; set {role}_split"
                    )
            plan = {
                role: (wanted[role], list(range(len(raw.splits[wanted[role]]))))
                for role in ("train", "test")
            }
        val = wanted["validation"]
        if val is not None and val not in raw.splits:
            raise ValueError(
                f"dataset {raw.name!r} has no validation split {val!r}; "
                f"splits found: {names}; set val_split, or None to use test"
            )
        if val is None and "validation" in raw.splits and len(names) > 1:
            val = "validation"
        plan["validation"] = (val, list(range(len(raw.splits[val])))) if val else plan["test"]
        if self.max_records is not None:
            rng = random.Random(self.seed)
            plan = {
                role: (name, sorted(rng.sample(idx, min(len(idx), self.max_records))))
                for role, (name, idx) in plan.items()
            }
        return plan

    def setup(self, stage: str | None = None) -> None:
        """Load, validate every record once, and build the split datasets (idempotent)."""
        if self.datasets:
            return
        if self.processor is not None and self.encoder is None:
            from safegrpo_pl.inputs import PromptEncoder

            self.encoder = PromptEncoder.from_pretrained(
                self.processor, guide=self.guide, trust_remote_code=self.trust_remote_code
            )
        raw = load_raw(self.dataset, demo=self.demo, cache_dir=self.cache_dir)
        plan = self._plan(raw)
        converters, kept = {}, {}
        for split in dict.fromkeys(name for name, _ in plan.values()):
            rows = raw.splits[split]
            image_column = check_columns(rows, raw.name, split)
            converters[split] = RowConverter(
                raw.name, split, image_column, raw.base_dir, default_source=raw.name
            )
            needed = sorted({i for name, idx in plan.values() if name == split for i in idx})
            kept[split], self.bad_records[split] = validate_rows(
                rows,
                needed,
                converters[split],
                encoder=self.encoder,
                max_prompt_length=self.max_prompt_length,
                on_bad_record=self.on_bad_record,
                on_long_prompt=self.on_long_prompt,
            )
        built = {}
        for role, (split, idx) in plan.items():
            indices = [i for i in idx if i in kept[split]]
            built[role] = SafetyDataset(raw.splits[split], indices, converters[split])
            self.source_counts[role] = dict(Counter(kept[split][i] for i in indices))
            log.info(
                "%s split (%s/%s): %d records by source %s",
                role,
                raw.name,
                split,
                len(indices),
                self.source_counts[role],
            )
        if stage in (None, "fit") and len(built["train"]) < self.batch_size:
            raise ValueError(
                f"the train split has {len(built['train'])} valid records, fewer than "
                f"batch_size={self.batch_size}: with drop_last (SPEC) there would be no batch. "
                "Lower batch_size or add data."
            )
        self.datasets = built

    @property
    def sources(self) -> list[str]:
        """Every `source` served by any split, sorted (metrics are split by it); [] before setup."""
        return sorted({source for counts in self.source_counts.values() for source in counts})

    @property
    def bad_record_counts(self) -> dict[str, int]:
        """Records dropped at setup, by kind, over all source splits."""
        total: Counter = Counter()
        for report in self.bad_records.values():
            total.update(report.counts)
        return dict(total)

    @property
    def collate_fn(self) -> Any:
        """The encoder (records -> `PromptBatch`) when a processor is set, else the records."""
        return self.encoder if self.encoder is not None else collate_records

    def _loader(self, role: str, batch_size: int, *, train: bool = False) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("SafeTagDataModule: call setup() before asking for a loader")
        return DataLoader(
            self.datasets[role],
            batch_size=batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled; drops the last partial batch (SPEC section 4)."""
        return self._loader("train", self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order."""
        return self._loader("test", self.eval_batch_size)
