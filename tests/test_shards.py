"""How the data is dealt to ranks, without starting processes: each rank's loaders are built
with the sampler arguments its strategy would give (`distributed_sampler_kwargs`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.data.rank_padding import PaddedToRanks, is_padding, padded_length, real_positions
from safegrpo_pl.demo.dataset import DemoConfig


def _rank_view(rank: int, ranks: int, **demo) -> SafeTagDataModule:
    data = SafeTagDataModule(dataset="demo", processor=None, batch_size=2, demo=DemoConfig(**demo))
    data.setup("fit")
    kwargs = {"num_replicas": ranks, "rank": rank}
    data.trainer = SimpleNamespace(
        strategy=SimpleNamespace(distributed_sampler_kwargs=kwargs), global_rank=rank
    )
    return data


def _ids(loader, epoch: int = 0) -> list[str]:
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    return [r.id for batch in loader for r in batch]


@pytest.mark.parametrize("num_train", [8, 9, 11])
def test_each_train_prompt_goes_to_one_rank_at_most_once_per_epoch(num_train):
    views = [_rank_view(r, 2, num_train=num_train, num_val=3, num_test=3) for r in range(2)]
    for epoch in range(2):
        dealt = [_ids(view.train_dataloader(), epoch) for view in views]
        assert len(dealt[0]) == len(dealt[1]), "ranks must take the same number of steps"
        everything = dealt[0] + dealt[1]
        assert len(set(everything)) == len(everything), f"a prompt was dealt twice: {dealt}"
        # whole batches only: at most batch_size x ranks - 1 prompts wait for the next epoch
        assert num_train - len(everything) < 2 * 2


def test_evaluation_padding_is_marked_and_every_record_counts_once():
    views = [_rank_view(r, 2, num_train=8, num_val=5, num_test=5) for r in range(2)]
    loaders = [view.val_dataloader() for view in views]
    shards = []
    for rank, loader in enumerate(loaders):  # what Lightning injects for evaluation
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
        shards.append([loader.dataset[i] for i in sampler])
    assert len(shards[0]) == len(shards[1]) == 3  # 5 records padded to 6
    counted = [r.id for shard in shards for i in real_positions(shard) for r in [shard[i]]]
    assert sorted(counted) == sorted(r.id for r in views[0].datasets["validation"])
    assert sum(is_padding(r) for shard in shards for r in shard) == 1


def test_padding_arithmetic():
    assert [padded_length(n, 4) for n in (1, 4, 5, 8)] == [4, 4, 8, 8]
    with pytest.raises(ValueError, match="empty"):
        PaddedToRanks([], 2)
