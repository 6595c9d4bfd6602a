"""Every process's random state, as checkpointable data: a resumed run samples what an unbroken
run would have sampled.

Each process draws its own completions (its own prompts, and under DDP its own seed), so the
checkpoint keeps one state per rank, gathered to rank 0 that writes the file. A generator that
the module keeps for sampling (its `sampling_generator`, when it has one) is saved with them.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def collect_rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """torch, Python, numpy (and CUDA) generator states, plus `generator`'s if given; only
    tensors and builtins, so that `torch.load(weights_only=True)` accepts them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        states["sampling"] = generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Put back what `collect_rng_states` saved (and `generator`'s state, if it was saved)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    if generator is not None and "sampling" in states:
        generator.set_state(states["sampling"])


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_rng_states(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every rank's `collect_rng_states`, in rank order (a collective under DDP: every process
    must call it, as Lightning does with `on_save_checkpoint`)."""
    mine = collect_rng_states(generator)
    if not _distributed() or torch.distributed.get_world_size() == 1:
        return {"ranks": [mine]}
    ranks: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, mine)
    return {"ranks": ranks}


def restore_rank_state(saved: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore this rank's state from what `gather_rng_states` saved.

    A checkpoint written by a different number of processes cannot be continued exactly;
    each rank then takes the state of rank `rank % saved ranks`, and a warning says so.
    Checkpoints from before per-rank states (one dict) are read as rank 0's.
    """
    ranks = saved.get("ranks", [saved])
    rank = torch.distributed.get_rank() if _distributed() else 0
    world = torch.distributed.get_world_size() if _distributed() else 1
    if len(ranks) != world:
        log.warning(
            "the checkpoint holds the random state of %d process(es), this run has %d: the "
            "resumed run will not sample what the interrupted one would have",
            len(ranks),
            world,
        )
    restore_rng_states(ranks[rank % len(ranks)], generator)
