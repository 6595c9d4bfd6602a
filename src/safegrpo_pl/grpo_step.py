"""The Lightning-free pieces of one GRPO step: how a rollout batch splits into optimiser steps,
and the figures logged for it.

A rollout batch of B prompts has N = B * G completions, laid out group by group (completion i of
prompt b is row b * G + i). Mini-batches (one optimiser step each) and micro-batches (one
forward/backward each) are lists of whole prompts, so a group is never split.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from safegrpo_pl.records import SafetyRecord
from safegrpo_pl.rewards import RewardParts


def prompt_chunks(num_prompts: int, size: int | None) -> list[list[int]]:
    """Consecutive chunks of `size` prompts (None: one chunk of all), with a clear error when
    the rollout batch does not divide."""
    size = size or num_prompts
    if num_prompts % size:
        raise ValueError(
            f"the rollout batch of {num_prompts} prompts does not split into mini/micro-batches"
            f" of {size} prompts; make data.batch_size a multiple of it"
        )
    return [list(range(start, start + size)) for start in range(0, num_prompts, size)]


def completion_rows(prompts: Sequence[int], group_size: int) -> list[int]:
    """The completion rows of `prompts` (completion i of prompt b is row b * G + i)."""
    return [p * group_size + i for p in prompts for i in range(group_size)]


def loss_mask(
    completion_mask: Tensor, rewards: Tensor, group_size: int, drop_zero_variance: bool
) -> Tensor:
    """The (N, T) tokens the loss counts: every completion token, or with `drop_zero_variance`
    only those of groups whose rewards are not all equal (`LossSettings.drop_zero_variance`)."""
    if not drop_zero_variance:
        return completion_mask
    grouped = rewards.view(-1, group_size)  # (B, G)
    informative = (grouped != grouped[:, :1]).any(dim=1)  # (B,)
    keep = informative.repeat_interleave(group_size).to(completion_mask.dtype)  # (N,)
    return completion_mask * keep[:, None]


def repeat_per_completion(values: Sequence[str], group_size: int) -> list[str]:
    """One entry per completion from one per prompt (each repeated G times, in row order)."""
    return [value for value in values for _ in range(group_size)]


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> Tensor:
    """The global L2 norm of the gradients (before clipping), 0 when none exists yet."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def rollout_figures(
    rewards: Tensor, parts: Sequence[RewardParts], lengths: Tensor, truncated: Tensor, group: int
) -> dict[str, Tensor]:
    """What the sampled completions scored (`train/...` figures, one row per rollout batch).

    Args:
        rewards: (N,) total rewards.
        parts: the N rewards' parts.
        lengths: (N,) completion lengths in tokens.
        truncated: (N,) bool, cut by the length budget.
        group: G, completions per prompt.
    """
    as_float = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
        "reward_format": as_float([p.format for p in parts]).mean(),
        "reward_tag": as_float([p.tag for p in parts]).mean(),
        "reward_behavior": as_float([p.behavior for p in parts]).mean(),
        "zero_var_groups": (rewards.view(-1, group).std(dim=1) == 0).float().mean(),
        "completion_length": lengths.float().mean(),
        "truncated": truncated.float().mean(),
    }


def mean_over_steps(step_figures: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Each figure of the optimiser steps of one rollout batch, averaged over the steps."""
    return {key: torch.stack([s[key] for s in step_figures]).mean() for key in step_figures[0]}


def prediction_rows(
    records: Sequence[SafetyRecord], texts: Sequence[str], parts: Sequence[RewardParts]
) -> list[dict[str, Any]]:
    """One plain dict per record: its labels, the decoded response and its reward parts."""
    return [
        {
            "id": r.id,
            "source": r.source,
            "novelty": r.novelty,
            "prompt": r.prompt,
            "image_tag": r.image_tag,
            "text_tag": r.text_tag,
            "combine_tag": r.combine_tag,
            "completion": text,
            **asdict(p),
        }
        for r, text, p in zip(records, texts, parts, strict=True)
    ]
