"""The resumable training loader: a saved position continues the epoch exactly where it was,
each process serves its own shard, and the order comes from (seed, epoch) alone."""

from __future__ import annotations

import logging

import torch

from safegrpo_pl.data.resumable import ResumableLoader, ResumableSampler


def _loader(n: int = 10, batch_size: int = 2, rank: int = 0, replicas: int = 1, seed: int = 0):
    data = list(range(n))
    sampler = ResumableSampler(data, num_replicas=replicas, rank=rank, seed=seed)
    return ResumableLoader(data, batch_size=batch_size, sampler=sampler)


def _epoch(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_a_saved_position_serves_the_rest_of_the_epoch():
    whole = _epoch(_loader(), 1)
    loader = _loader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    first = [next(iterator).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 2
    fresh = _loader(seed=99)  # the checkpoint's seed wins over the new run's
    fresh.load_state_dict(state)
    rest = _epoch(fresh, 1)
    assert first + rest == whole, "the resumed epoch repeats or skips batches"
    assert fresh.state_dict()["batches"] == len(whole), "position counts the skipped batches"
    assert _epoch(fresh, 2) == _epoch(_loader(), 2), "the next epoch starts afresh"


def test_a_position_at_the_end_of_an_epoch_starts_the_next():
    loader = _loader()
    whole = _epoch(loader, 0)
    fresh = _loader()
    fresh.load_state_dict(loader.state_dict())
    assert fresh.sampler.epoch == 1
    assert _epoch(fresh, 1) == _epoch(_loader(), 1) != whole


def test_the_order_is_shuffled_by_seed_and_epoch_without_the_global_random_state():
    before = torch.get_rng_state()
    orders = [_epoch(_loader(seed=s), e) for s, e in [(0, 0), (0, 1), (5, 0)]]
    assert torch.equal(torch.get_rng_state(), before), "the loader drew global random numbers"
    flat = [_flat(order) for order in orders]
    assert len({tuple(f) for f in flat}) == 3, "seed and epoch must both change the order"
    assert flat[0] != sorted(flat[0]), "not shuffled"
    assert _epoch(_loader(seed=0), 0) == orders[0], "the same seed and epoch differ"


def test_each_process_serves_its_own_shard():
    shards = [_flat(_epoch(_loader(rank=r, replicas=2), 0)) for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and len(shards[0]) == len(shards[1]) == 4


def test_another_batch_size_restarts_the_epoch_with_a_warning(caplog):
    loader = _loader()
    loader.sampler.set_epoch(0)
    next(iter(loader))
    fresh = _loader(batch_size=5)
    with caplog.at_level(logging.WARNING):
        fresh.load_state_dict(loader.state_dict())
    assert "batch_size 2 -> 5" in caplog.text
    assert len(_epoch(fresh, 0)) == 2, "the epoch is served whole"


def test_worker_processes_prefetching_ahead_do_not_move_the_saved_position():
    data = list(range(12))

    def loader() -> ResumableLoader:
        sampler = ResumableSampler(data, seed=3)
        return ResumableLoader(data, batch_size=2, sampler=sampler, num_workers=1)

    whole = _epoch(loader(), 0)
    first = loader()
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(2)]  # the worker has fetched further
    fresh = loader()
    fresh.load_state_dict(first.state_dict())
    assert head + _epoch(fresh, 0) == whole
