"""Bounded-memory rollouts: sampling and the no-grad log-prob passes, a chunk of prompts at a time.

Why: the rollout batch of one process can be far larger than what fits through the model at
once (the paper's setting: 64 prompts x G 8 = 512 sequences of up to 4,096 new tokens per GPU).
`model.rollout_micro_batch_size` bounds the prompts that are decoded or re-scored together;
a chunk always holds whole groups (all G completions of its prompts), because the prompt's
prefill is shared by its group.

Chunking changes memory only, never the numbers:
- Sampling draws its noise from one generator PER PROMPT, each seeded from the step's generator
  (or the global RNG) before any chunk runs (`prompt_generators`). A prompt's completions then
  see the same draws whichever chunk it lands in and however long the other prompts run; a
  single shared stream would instead depend on which rows were decoded together and for how
  many steps. (Drawing the whole batch's noise and slicing it would also do, but needs the
  noise of every step of every chunk up front.)
- The log-prob passes score each chunk's rows on their own and write them back into the full
  (N, T) layout; a row's log-probs depend only on its prompt and completion.
Floating-point results may differ in the last bits between chunk sizes (matrix products over a
different number of rows, a different amount of left padding); the tests bound this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.rl.grpo import completion_rows


def rollout_chunks(num_prompts: int, size: int | None) -> list[list[int]]:
    """Consecutive chunks of at most `size` prompts (None: one chunk of all); the last may be
    smaller, since a chunk only bounds memory."""
    if size is not None and size < 1:
        raise ValueError(
            f"model.rollout_micro_batch_size is {size}; expected >= 1 prompts (or null: the "
            "whole rollout batch at once)"
        )
    size = size or max(num_prompts, 1)
    return [list(range(s, min(s + size, num_prompts))) for s in range(0, num_prompts, size)]


def prompt_generators(
    num_prompts: int, generator: torch.Generator | None, device: torch.device
) -> list[torch.Generator]:
    """One generator per prompt on `device`, seeded from `generator` (or the global RNG).

    The seeds are drawn in one call, so the step's generator advances by the same amount
    whatever the chunking.
    """
    where = generator.device if generator is not None else torch.device("cpu")
    seeds = torch.randint(0, 2**62, (num_prompts,), generator=generator, device=where).tolist()
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]


def pad_right(pieces: Sequence[Tensor], value: float) -> Tensor:
    """Stack (n_i, T_i) pieces row-wise into (sum n_i, max T_i), right-padded with `value`."""
    width = max(piece.shape[1] for piece in pieces)
    padded = [
        torch.nn.functional.pad(piece, (0, width - piece.shape[1]), value=value) for piece in pieces
    ]
    return torch.cat(padded, 0)


def chunked_decode(
    decode: Callable[[PromptBatch, Any], tuple[Tensor, Tensor | None]],
    batch: PromptBatch,
    chunk_size: int | None,
    generator: torch.Generator | None,
    *,
    per_prompt: bool,
    pad_token_id: int,
) -> tuple[Tensor, Tensor | None]:
    """(N, T) ids and, when `decode` gives them, (N, T) per-token log-probs (else None), from
    `decode(sub_batch, generators)`, a chunk of prompts at a time.

    With `per_prompt`, `decode` gets one generator per prompt of its chunk (`prompt_generators`);
    otherwise it gets `generator` itself (greedy decoding, or a path that cannot use them).
    """
    chunks = rollout_chunks(len(batch), chunk_size)
    device = batch.input_ids.device
    generators = prompt_generators(len(batch), generator, device) if per_prompt else []
    pieces, logps = [], []
    for prompts in chunks:
        sub = batch if len(chunks) == 1 else batch.select(prompts)
        draws = [generators[p] for p in prompts] if per_prompt else generator
        ids, logp = decode(sub, draws)
        pieces.append(ids)
        logps.append(logp)
    if any(logp is None for logp in logps):
        return pad_right(pieces, pad_token_id), None
    return pad_right(pieces, pad_token_id), pad_right(logps, 0)


def chunked_scores(
    score: Callable[[PromptBatch, Tensor, Tensor], Tensor],
    batch: PromptBatch,
    ids: Tensor,
    mask: Tensor,
    chunks: Sequence[Sequence[int]],
    skip: Sequence[int] = (),
) -> Tensor:
    """(N, T) log-probs from `score(sub_batch, ids, mask)`, a chunk of prompts at a time.

    Each chunk's completions are cut to its longest one before scoring (the rest is padding),
    so the pass also holds only that chunk's activations. Prompts in `skip` are not scored
    (their rows stay 0): the caller has their log-probs from elsewhere.
    """
    group_size = ids.shape[0] // len(batch)
    out = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    skipped = set(skip)
    for chunk in chunks:
        prompts = [p for p in chunk if p not in skipped]
        if not prompts:
            continue
        rows = completion_rows(prompts, group_size)
        chunk_mask = mask[rows]
        width = int(chunk_mask.sum(1).max().item()) if ids.shape[1] else 0
        if width == 0:
            continue
        sub = batch if len(prompts) == len(batch) else batch.select(prompts)
        values = score(sub, ids[rows, :width], chunk_mask[:, :width])
        out[rows, :width] = values
    return out
