"""Two gloo ranks run the rank helpers the variants add to: advantages whitened over every
rank's completions, and loss statistics with the optional entropy and sampler-KL sums.

Usage: python tests/variants_ranks.py OUT_DIR (writes rank0.pt, rank1.pt); see
tests/test_distributed_variants.py.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from safegrpo_pl.rl.distributed import advantages_over_ranks, sync_loss_stats
from safegrpo_pl.rl.grpo import LossSettings, LossStats

GROUP = 4


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards (16,), lengths (16,)) of the whole rollout batch: 2 ranks x 2 groups of 4."""
    rewards = torch.tensor([1, 0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 1, 1, 0, 0.75, 0, 0.5, 1, 1.0])
    lengths = torch.tensor([3, 7, 2, 5, 4, 4, 9, 1, 6, 2, 8, 3, 5, 5, 2, 7])
    return rewards, lengths


def stats(rank: int) -> LossStats:
    values = [float(v) + rank for v in range(10)]
    t = [torch.tensor(v, dtype=torch.float64) for v in values]
    return LossStats(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9])


def run_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rewards, lengths = global_batch()
    mine = slice(rank * 8, rank * 8 + 8)
    settings = LossSettings(advantage_estimator="reinforce_plus_plus_baseline")
    advantages, every_rank = advantages_over_ranks(
        rewards[mine], GROUP, settings, lengths=lengths[mine]
    )
    synced = sync_loss_stats(stats(rank))
    torch.save(
        {"advantages": advantages, "every_rank": every_rank, "stats": synced.as_dict()},
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def main(out: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(run_rank, args=(port, out), nprocs=2)


if __name__ == "__main__":
    main(sys.argv[1])
