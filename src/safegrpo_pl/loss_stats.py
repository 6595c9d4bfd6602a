"""`LossStats`: what one GRPO loss call saw, kept as sums so micro-batches merge exactly.

A mini-batch split into micro-batches for memory must log the same figures as one pass. Means
do not add up, sums do: each call keeps token sums and counts, `merge` adds sums, takes the max
of maxima and the min of minima, and the means are divided out once, when logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _share(total: Tensor, count: Tensor) -> Tensor:
    return total / torch.where(count > 0, count, torch.ones_like(count))


@dataclass(frozen=True)
class LossStats:
    """Detached 0-dim statistics of one or more `grpo_loss` calls of the same mini-batch.

    Attributes:
        policy_loss: the surrogate part of the loss, with the loss's own aggregation and
            normaliser; additive over the micro-batches of a mini-batch.
        kl_sum: sum of the per-token KL estimate over unmasked tokens; None without a reference.
        clipped: unmasked tokens where the eps-clip branch was taken.
        dual_clipped: unmasked tokens capped by the dual clip.
        ratio_sum: sum of the importance ratio over unmasked tokens.
        ratio_min: smallest ratio over unmasked tokens (+inf when there are none).
        ratio_max: largest ratio over unmasked tokens (-inf when there are none).
        num_tokens: unmasked tokens.
    """

    policy_loss: Tensor
    kl_sum: Tensor | None
    clipped: Tensor
    dual_clipped: Tensor
    ratio_sum: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    num_tokens: Tensor

    def merge(self, other: LossStats) -> LossStats:
        """The statistics of both calls together (sums of sums, max of maxima, min of minima)."""
        if (self.kl_sum is None) != (other.kl_sum is None):
            raise ValueError("cannot merge loss statistics with and without a KL term")
        return LossStats(
            policy_loss=self.policy_loss + other.policy_loss,
            kl_sum=None if self.kl_sum is None else self.kl_sum + other.kl_sum,
            clipped=self.clipped + other.clipped,
            dual_clipped=self.dual_clipped + other.dual_clipped,
            ratio_sum=self.ratio_sum + other.ratio_sum,
            ratio_min=torch.minimum(self.ratio_min, other.ratio_min),
            ratio_max=torch.maximum(self.ratio_max, other.ratio_max),
            num_tokens=self.num_tokens + other.num_tokens,
        )

    @property
    def kl(self) -> Tensor | None:
        """Token-mean KL estimate, or None without a reference."""
        return None if self.kl_sum is None else _share(self.kl_sum, self.num_tokens)

    def as_dict(self) -> dict[str, Tensor]:
        """The logged figures: token means and shares, ratio extremes (1 when no token)."""
        any_token = bool(self.num_tokens > 0)
        one = torch.ones_like(self.ratio_sum)
        figures = {
            "policy_loss": self.policy_loss,
            "clip_frac": _share(self.clipped, self.num_tokens),
            "dual_clip_frac": _share(self.dual_clipped, self.num_tokens),
            "ratio_mean": _share(self.ratio_sum, self.num_tokens) if any_token else one,
            "ratio_min": self.ratio_min if any_token else one,
            "ratio_max": self.ratio_max if any_token else one,
            "num_tokens": self.num_tokens,
        }
        if self.kl_sum is not None:
            figures["kl"] = _share(self.kl_sum, self.num_tokens)
        return figures
