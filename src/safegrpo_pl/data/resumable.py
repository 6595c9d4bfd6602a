"""A training loader that a checkpoint can stop and restart in the middle of an epoch.

A GRPO epoch on the paper's setting is hours long and most checkpoints fall inside one. Lightning
saves a training loader's position only when the loader has `state_dict` / `load_state_dict`
(it stores them under the fit loop's "combined_loader" and hands them back before iterating
again on resume); a plain `DataLoader` has neither, so a resumed run would start the epoch over
with a fresh shuffle. `ResumableLoader` has them, and `ResumableSampler` draws every epoch's
order from (seed, epoch) alone, so the order a resumed run sees is the one the unbroken run saw.

Why the order does not come from the global random state (as `RandomSampler`'s does): the
global state is restored from the checkpoint, and an order drawn from it when the resumed run
creates its iterator would consume draws that the unbroken run spent on sampling completions.

Under DDP each process serves its own shard (`DistributedSampler`'s split by rank: Lightning
sees a `DistributedSampler` and leaves the loader alone). Every process has consumed the same
number of batches, so the one position in the checkpoint (rank 0's) serves them all.

Lightning's training loop fetches a sized loader's batches one at a time, without prefetching
(it knows the last batch from the length), so the batches this loader has yielded in the
current epoch are the batches trained on: that count is the saved position.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class ResumableSampler(DistributedSampler):
    """This process's share of a (seed, epoch)-shuffled order, optionally starting part-way.

    Args:
        dataset: the map-style dataset.
        num_replicas: processes sharing the data (1 without DDP).
        rank: this process's index among them.
        seed: with the epoch, decides the order (the same on every process).
        shuffle: shuffle each epoch (else dataset order).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        # drop_last: the remainder that does not split evenly waits for the next epoch's order
        # rather than being padded with repeated prompts (a prompt is used once per epoch).
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=True,
        )
        self._skip = 0  # samples of this process's share to skip in the next pass only

    def skip_next(self, samples: int) -> None:
        """Start the next pass `samples` into this process's share (a resumed epoch)."""
        self._skip = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """A `DataLoader` over a `ResumableSampler` whose position Lightning checkpoints.

    `state_dict()` holds the epoch being served, the batches of it already yielded, and what
    decides the order (seed, batch size, processes); `load_state_dict` makes the next pass over
    that epoch start after those batches. Batches are whole (`drop_last`): a resumed epoch
    then has exactly the batches the unbroken one had left.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, sampler: ResumableSampler, **kwargs):
        # A generator of its own: a `DataLoader` draws its workers' base seed when an iterator
        # is made, from the global random state unless given one, and a resumed run makes its
        # iterator after that state was restored.
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._epoch = sampler.epoch  # the epoch of the current (or last) pass
        self._yielded = 0  # batches of that epoch handed out, counting skipped ones
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body runs at the first `next`, after Lightning has called
        # `sampler.set_epoch` for the epoch about to run.
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        start = 0
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == sampler.epoch:
            start = resume["batches"]
        sampler.skip_next(start * self.batch_size)
        self._epoch, self._yielded = sampler.epoch, start
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": self._epoch,
            "batches": self._yielded,
            "seed": sampler.seed,
            "batch_size": int(self.batch_size or 0),
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        # The checkpoint decides the order, whatever seed this run was started with.
        sampler.seed = int(state_dict["seed"])
        changed = [
            f"{name} {state_dict[name]} -> {now}"
            for name, now in (
                ("batch_size", self.batch_size),
                ("num_replicas", sampler.num_replicas),
            )
            if int(state_dict[name]) != now
        ]
        if changed:
            log.warning(
                "resuming the train loader with %s: the rest of epoch %d is served from its "
                "start; the run will not repeat the interrupted one exactly",
                ", ".join(changed),
                state_dict["epoch"],
            )
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if batches >= len(self):  # that epoch was finished: the next one starts afresh
            epoch, batches = epoch + 1, 0
        sampler.set_epoch(epoch)
        self._resume = {"epoch": epoch, "batches": batches}
