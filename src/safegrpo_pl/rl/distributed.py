"""What a GRPO step needs to agree on across processes (Lightning's DDP or FSDP2 strategies).

Every function here is a no-op in a single process, so the same step code runs on one CPU and
on many GPUs. The rules they implement (see docs/method.md section 4 for the loss itself):
- Sums, never means, cross the wire. The token-mean of a mini-batch split over W ranks is
  `sum over ranks of token sums / sum over ranks of token counts`: each rank divides its own
  numerator by the all-reduced denominator (`global_normalizer`), and the per-rank losses then
  add up to the one-process loss.
- DDP and FSDP2 both AVERAGE gradients over ranks. Each rank's loss is a share of a SUM, so it
  is multiplied by the number of data-parallel ranks before backward (`gradient_scale`); the
  averaged gradient is then the gradient of the summed loss, the one-process gradient.
- A collective is called by every rank or by none: each helper here is called on all ranks.

Each rank also samples with its own generator (`sampling_generator`), seeded from the global
seed and the rank, so ranks draw different completions and a run is reproducible.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from safegrpo_pl.rl.grpo import LossSettings, LossStats, estimate_advantages, group_advantages


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def data_parallel_size(trainer: Any) -> int:
    """How many ranks hold different data (the strategy's sampler replicas); 1 without one."""
    if trainer is None:
        return 1
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("num_replicas", 1))


def data_parallel_rank(trainer: Any) -> int:
    """This rank's index among the data-parallel ranks; 0 without a strategy."""
    if trainer is None:
        return 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return int(kwargs.get("rank", 0))


def global_seed() -> int:
    """The seed `seed_everything` (the CLI's `seed_everything:` key) set; 0 when none."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


def sampling_seed(seed: int, rank: int) -> int:
    """A well-mixed 63-bit seed for (global seed, rank): nearby seeds give unrelated streams."""
    state = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def sampling_generator(seed: int, rank: int, device: torch.device | str) -> torch.Generator:
    """The generator one rank samples its rollouts with (on the device the logits live on)."""
    return torch.Generator(device=device).manual_seed(sampling_seed(seed, rank))


def sum_over_ranks(value: float | Tensor) -> Tensor:
    """The sum of `value` over all ranks, in float64 (token counts stay exact), as a tensor."""
    total = torch.as_tensor(value, dtype=torch.float64).detach().clone()
    if is_distributed():
        total = _on_backend_device(total)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def global_normalizer(local: float) -> float:
    """The mini-batch's loss denominator over all ranks (token count, sequences, budget).

    Every aggregation's denominator is additive over rows, so the global one is the sum of the
    ranks' own (`safegrpo_pl.rl.grpo.aggregation_normalizer`).
    """
    return float(sum_over_ranks(local))


def gradient_scale(data_parallel_size: int) -> float:
    """The factor each rank's loss is multiplied by before backward (see the module doc)."""
    return float(data_parallel_size)


def all_done(finished: Tensor) -> bool:
    """Whether every row on EVERY rank has finished (one all-reduce per decode step).

    Ranks whose models are sharded must run the same number of forwards, so a rank whose rows
    all ended keeps decoding padding until the others are done too.
    """
    done = torch.as_tensor(bool(finished.all()), dtype=torch.int32)
    if is_distributed():
        done = _on_backend_device(done)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done.item())


def sync_loss_stats(stats: LossStats) -> LossStats:
    """The statistics of the whole mini-batch over all ranks: sums added, extremes combined."""
    if not is_distributed():
        return stats
    optional = ("kl_sum", "entropy_sum", "sampler_kl_sum")
    present = [name for name in optional if getattr(stats, name) is not None]
    sums = [stats.policy_loss, stats.clipped, stats.dual_clipped, stats.ratio_sum]
    sums += [stats.num_tokens] + [getattr(stats, name) for name in present]
    packed = _on_backend_device(torch.stack([s.detach().double() for s in sums]))
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    low = _on_backend_device(stats.ratio_min.detach().double().reshape(1).clone())
    high = _on_backend_device(stats.ratio_max.detach().double().reshape(1).clone())
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dtype, device = stats.policy_loss.dtype, stats.policy_loss.device
    values = [v.to(dtype=dtype, device=device) for v in packed.cpu()]
    summed = dict(zip(present, values[5:], strict=True))
    return LossStats(
        policy_loss=values[0],
        kl_sum=summed.get("kl_sum"),
        clipped=values[1],
        dual_clipped=values[2],
        ratio_sum=values[3],
        ratio_min=low.cpu()[0].to(dtype=dtype, device=device),
        ratio_max=high.cpu()[0].to(dtype=dtype, device=device),
        num_tokens=values[4],
        entropy_sum=summed.get("entropy_sum"),
        sampler_kl_sum=summed.get("sampler_kl_sum"),
    )


def gather_rewards(rewards: Tensor) -> Tensor:
    """(W * N,) every rank's rewards, rank by rank (ranks hold equal numbers of completions)."""
    if not is_distributed():
        return rewards
    local = _on_backend_device(rewards.detach().double().contiguous())
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(dtype=rewards.dtype, device=rewards.device)


def local_slice(values: Tensor, count: int) -> Tensor:
    """This rank's `count` entries of a tensor gathered rank by rank (`gather_rewards`)."""
    start = rank() * count
    return values[start : start + count]


def advantages_over_ranks(
    rewards: Tensor, group_size: int, settings: LossSettings, lengths: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(this rank's advantages (N,), every rank's rewards (W * N,)).

    Groups never straddle ranks, so "group" scaling needs only this rank's rewards; "batch"
    scaling and the "reinforce_plus_plus_baseline" whitening take the whole rollout batch,
    every rank's rewards (and completion lengths) together. `lengths` (N,) is needed by
    estimators other than "grpo" only.
    """
    every_rank = gather_rewards(rewards)
    if settings.advantage_estimator == "grpo":
        advantages = group_advantages(
            every_rank, group_size, scale=settings.advantage_scale, eps=settings.advantage_eps
        )
    else:
        if lengths is None:
            raise ValueError(f"advantage_estimator {settings.advantage_estimator!r} needs lengths")
        advantages = estimate_advantages(
            every_rank,
            gather_rewards(lengths.to(every_rank.dtype)),
            group_size,
            estimator=settings.advantage_estimator,
        )
    return local_slice(advantages, len(rewards)), every_rank


def min_over_ranks(value: int) -> int:
    """The smallest `value` of all ranks (`value` itself on one process): a count every rank
    then agrees on (dynamic sampling's informative groups held)."""
    if not is_distributed():
        return value
    smallest = _on_backend_device(torch.tensor(value, dtype=torch.int64))
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    return int(smallest.item())


def check_equal_across_ranks(name: str, value: int) -> None:
    """Raise on every rank when `value` differs between ranks (the step counts would differ)."""
    if not is_distributed():
        return
    bounds = _on_backend_device(torch.tensor([value, -value], dtype=torch.int64))
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    if int(bounds[0]) != -int(bounds[1]):
        raise RuntimeError(
            f"{name} differs between ranks ({-int(bounds[1])} to {int(bounds[0])}): every rank "
            "must take the same number of optimiser steps; give each rank the same batch size"
        )


def _on_backend_device(tensor: Tensor) -> Tensor:
    """NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return tensor.to(f"cuda:{torch.cuda.current_device()}")
    return tensor
