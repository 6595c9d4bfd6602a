"""Evaluation data split over ranks: every record counted once, every rank the same steps.

Lightning gives each rank a `DistributedSampler` shard. For validation and test that sampler
pads the split with repeated records until it divides by the number of ranks, so up to W - 1
records would be counted twice. Dropping the padding instead (Lightning's predict sampler does)
leaves ranks with different numbers of batches, and ranks that decode with sharded weights
must run the same number of forwards or they wait on each other forever.

So the padding is kept but marked: `PaddedToRanks` appends copies of the first records as
`PaddingRecord`s until the split divides by W (the sampler then adds none), every rank
decodes its full shard, and the metrics and reports leave `is_padding` records out.

Training needs none of this: prompts are sharded whole (a group never straddles ranks) and
the loss is normalised over all ranks (`safegrpo_pl.rl.distributed`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from safegrpo_pl.core.records import SafetyRecord


@dataclasses.dataclass(frozen=True)
class PaddingRecord(SafetyRecord):
    """A copy of a real record that only fills a rank's last batch: decoded, never counted."""


def is_padding(record: Any) -> bool:
    return isinstance(record, PaddingRecord)


def real_positions(records: Sequence[Any]) -> list[int]:
    """The positions of the records that count (not padding)."""
    return [i for i, record in enumerate(records) if not is_padding(record)]


def counted(records: Sequence[Any], *columns: Sequence[Any]) -> tuple[list[Any], ...]:
    """`records` and the aligned `columns` (texts, rewards, ...) without the padding rows."""
    keep = real_positions(records)
    return tuple([column[i] for i in keep] for column in (records, *columns))


def padded_length(length: int, num_ranks: int) -> int:
    """The smallest multiple of `num_ranks` that holds `length` records (at least one each)."""
    return max(-(-length // num_ranks), 1) * num_ranks


class PaddedToRanks(Dataset):
    """`dataset` plus `PaddingRecord` copies of its first records, to a multiple of `num_ranks`.

    Args:
        dataset: a map-style dataset of `SafetyRecord`s.
        num_ranks: the number of data-parallel ranks sharing it.
    """

    def __init__(self, dataset: Any, num_ranks: int) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks is {num_ranks}; expected at least 1")
        if len(dataset) == 0:
            raise ValueError("cannot shard an empty split over ranks")
        self.dataset = dataset
        self.length = padded_length(len(dataset), num_ranks)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int) -> SafetyRecord:
        if not 0 <= item < self.length:
            raise IndexError(f"index {item} out of range for {self.length} records")
        size = len(self.dataset)
        record = self.dataset[item % size]
        if item < size:
            return record
        fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
        return PaddingRecord(**fields)
