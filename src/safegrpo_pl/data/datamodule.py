"""Serving validated SafeTag-VL-style records: the split datasets, collate, `SafeTagDataModule`.

Loading and validating the records lives in `safegrpo_pl.data.sources` (what `dataset=` may be, the
columns, the error messages); this module decides the splits, keeps the records that passed
validation, and builds the loaders. Images are decoded again when a record is served rather than
kept decoded, so a real dataset costs its Arrow file (memory-mapped), not gigabytes of pixels.

Splits: train, validation, test. The paper validates on the test split (docs/method.md section 4.12), so without a validation
split the test split serves as both; a dataset with a single split is split with a seed.
Under DDP or FSDP each process loads the data. The training loader shards itself by rank,
dealing out whole prompts (a group never straddles ranks; the remainder is dropped rather than
repeated), and can resume in the middle of an epoch (`safegrpo_pl.data.resumable`). The evaluation
splits are padded to a multiple of the number of ranks with marked copies that the metrics
leave out (`safegrpo_pl.data.rank_padding`): every record counts once; Lightning shards those loaders by
injecting a `DistributedSampler` (`use_distributed_sampler=True`).

Departures from the authors' pipeline (the bad-record policy is listed in `sources`):
- `max_records` keeps a seeded random subset per split (for quick runs), not the first rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from safegrpo_pl.core.prompts import DEFAULT_SAFETY_GUIDE
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.data.rank_padding import PaddedToRanks
from safegrpo_pl.data.resumable import ResumableLoader, ResumableSampler
from safegrpo_pl.data.sources import (
    BadRecordReport,
    RawData,
    RowConverter,
    Rows,
    check_columns,
    load_raw,
    seeded_split,
    validate_rows,
)
from safegrpo_pl.demo.dataset import DRAWING_VERSION, DemoConfig
from safegrpo_pl.rl.distributed import data_parallel_rank, data_parallel_size

log = logging.getLogger(__name__)


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
        max_prompt_length: longest prompt in tokens, image tokens included (the paper: 2048; docs/method.md section 4.11).
        on_bad_record: "raise" on the first malformed record, or "skip" it (counted, logged).
        on_long_prompt: "skip" (the paper: dropped at setup and counted) or "raise".
        seed: seed of the split of a single-split dataset and of `max_records` sampling.
        test_fraction: share held out for test when the dataset has a single split.
        train_split: name of the training split.
        val_split: name of the validation split; None: "validation" if present, else the test
            split (the paper validates on the test split).
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
            from safegrpo_pl.policy.inputs import PromptEncoder

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
                f"batch_size={self.batch_size}: the training loader drops the last partial batch, so there would be none. "
                "Lower batch_size or add data."
            )
        self.datasets = built

    def train_records(self) -> SafetyDataset:
        """The validated train split (setting the data up for "fit" if nobody has yet)."""
        if not self.datasets:
            self.setup("fit")
        return self.datasets["train"]

    def warmup_key(self) -> dict[str, Any]:
        """What identifies the training set for the warm-up's cache, without decoding images.

        The dataset's name, the demo set's config and drawing version (when it is the demo),
        the guide, the record cap, the seed and the number of train records: any change trains
        another warm-up.
        """
        demo = {**dataclasses.asdict(self.demo), "drawing_version": DRAWING_VERSION}
        return {
            "dataset": str(self.dataset),
            "demo": demo if self.dataset == "demo" else None,
            "guide": self.guide,
            "max_records": self.max_records,
            "seed": self.seed,
            "num_train": len(self.train_records()),
        }

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

    def _loader(self, role: str, batch_size: int) -> DataLoader:
        if not self.datasets:
            raise RuntimeError("SafeTagDataModule: call setup() before asking for a loader")
        dataset: Dataset = self.datasets[role]
        ranks = data_parallel_size(getattr(self, "trainer", None))
        if ranks > 1:
            dataset = PaddedToRanks(dataset, ranks)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            # A generator of its own: without one each new iterator draws a seed from the
            # global random state, and an evaluation would shift the rollouts that follow it
            # (a resumed run that skips an evaluation would then sample other completions).
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled; drops the last partial batch (docs/method.md section 4); resumable in the
        middle of an epoch (`safegrpo_pl.data.resumable`), and sharded by rank under DDP."""
        if not self.datasets:
            raise RuntimeError("SafeTagDataModule: call setup() before asking for a loader")
        trainer = self.trainer
        # The global seed when the run has one (`seed_everything`), as Lightning's own
        # distributed sampler does; else the data seed. A checkpoint restores the seed it used.
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))
        sampler = ResumableSampler(
            self.datasets["train"],
            # the data-parallel ranks (the strategy's sampler arguments, as Lightning's own)
            num_replicas=data_parallel_size(trainer),
            rank=data_parallel_rank(trainer),
            seed=seed,
        )
        return ResumableLoader(
            self.datasets["train"],
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        """The test split, in order."""
        return self._loader("test", self.eval_batch_size)
