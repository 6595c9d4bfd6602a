"""Loss aggregation: how per-token GRPO losses become one number (docs/method.md section 4).

Every aggregation is written as `numerator(values, mask) / denominator(mask, L_max)`. The
numerator is a plain sum over rows, so when a mini-batch is split into micro-batches for memory,
each micro-batch divides its numerator by the MINI-batch's denominator and the backpropagated
pieces add up exactly to the one-pass gradient. Masked entries are replaced by zeros (never
multiplied by zero), so inf or NaN in the padding cannot leak into a mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

_T = TypeVar("_T")


def pick_variant(table: Mapping[str, _T], name: str, field: str) -> _T:
    """Pick a variant by name, with an error that lists the valid names."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"{field} is {name!r}; expected one of {sorted(table)}") from None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision and integers, otherwise the input's own float type."""
    return torch.promote_types(dtype, torch.float32)


def safe_count(count: Tensor) -> Tensor:
    """A denominator that is 1 where the count is 0, so empty sets give 0 and no NaN gradient."""
    return torch.where(count > 0, count, torch.ones_like(count))


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is 1 (over all, or along `dim`); 0 where nothing is kept.

    Masked entries are replaced by 0 rather than multiplied by 0, so inf/NaN there cannot leak.
    """
    keep = mask.bool()
    weights = keep.to(values.dtype)
    kept = torch.where(keep, values, torch.zeros_like(values))
    if dim is None:
        return kept.sum() / safe_count(weights.sum())
    return kept.sum(dim) / safe_count(weights.sum(dim))


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation, written as `numerator(values, mask) / denominator(mask, L_max)`.

    Splitting it this way is what makes micro-batching exact: the numerator is a plain sum over
    rows, so micro-batch numerators add up to the mini-batch's; dividing each by the
    MINI-batch's denominator (`loss_normalizer`) then sums to the one-pass loss.

    Attributes:
        numerator: (values (N, T), mask (N, T) float 0/1) -> 0-dim tensor, additive over rows.
        denominator: (mask (N, T), max_completion_length or None) -> 0-dim tensor: this
            call's own normaliser.
    """

    numerator: Callable[[Tensor, Tensor], Tensor]
    denominator: Callable[[Tensor, int | None], Tensor]

    def __call__(
        self,
        values: Tensor,
        mask: Tensor,
        *,
        normalizer: float | None = None,
        max_completion_length: int | None = None,
    ) -> Tensor:
        """Aggregate (N, T) `values` under a 0/1 `mask` to a 0-dim tensor.

        `normalizer`, when given, replaces this call's own denominator (see `grpo_loss`).
        """
        keep = mask.bool()
        weights = keep.to(values.dtype)  # (N, T)
        kept = torch.where(keep, values, torch.zeros_like(values))  # (N, T)
        if normalizer is None:
            denominator = safe_count(self.denominator(weights, max_completion_length))
        elif normalizer > 0:
            denominator = torch.tensor(normalizer, dtype=values.dtype, device=values.device)
        else:
            raise ValueError(f"loss_normalizer is {normalizer}; expected a positive number")
        return self.numerator(kept, weights) / denominator


def _token_sum(values: Tensor, weights: Tensor) -> Tensor:
    return values.sum()


def _token_count(weights: Tensor, max_completion_length: int | None) -> Tensor:
    return weights.sum()


def _sum_of_sequence_means(values: Tensor, weights: Tensor) -> Tensor:
    return (values.sum(1) / safe_count(weights.sum(1))).sum()  # empty rows add 0


def _sequence_count(weights: Tensor, max_completion_length: int | None) -> Tensor:
    return (weights.sum(1) > 0).sum().to(weights.dtype)  # rows with at least one token


def _budget(weights: Tensor, max_completion_length: int | None) -> Tensor:
    if max_completion_length is None:
        raise ValueError(
            "aggregation 'seq-mean-token-sum-norm' needs max_completion_length (the generation "
            "budget, a constant) or a loss_normalizer; the padded width would vary per batch"
        )
    if weights.shape[1] > max_completion_length:
        raise ValueError(
            f"mask has {weights.shape[1]} token columns but max_completion_length is "
            f"{max_completion_length}; pass the budget the completions were sampled with"
        )
    return torch.tensor(
        float(weights.shape[0] * max_completion_length), dtype=weights.dtype, device=weights.device
    )


AGGREGATIONS: dict[str, Aggregation] = {
    # sum(L * m) / sum(m): every token of the mini-batch weighs the same (default)
    "token-mean": Aggregation(_token_sum, _token_count),
    # mean over sequences of each sequence's token mean (the paper's 1/|o_i| form)
    "seq-mean-token-mean": Aggregation(_sum_of_sequence_means, _sequence_count),
    # Dr. GRPO: sum(L * m) / (N * max_completion_length), a constant normaliser
    "seq-mean-token-sum-norm": Aggregation(_token_sum, _budget),
}


def aggregation_normalizer(
    aggregation: str, mask: Tensor, max_completion_length: int | None = None
) -> float:
    """The `loss_normalizer` to pass to every micro-batch of the mini-batch with this `mask`.

    token-mean: the mini-batch's unmasked token count; seq-mean-token-mean: its number of
    non-empty sequences; seq-mean-token-sum-norm: its rows times `max_completion_length`.
    Computed from the whole mini-batch's (N, T) mask, before it is split.
    """
    agg = pick_variant(AGGREGATIONS, aggregation, "aggregation")
    weights = mask.bool().to(torch.float64)
    return float(safe_count(agg.denominator(weights, max_completion_length)))
