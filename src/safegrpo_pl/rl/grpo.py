"""GRPO math as pure tensor functions: advantages, KL estimators, clipped surrogate, loss.

Everything here takes tensors and returns tensors (docs/method.md section 4); nothing knows about models,
Lightning or rewards. Rows are completions laid out group by group: completion i of prompt b is
row `b * group_size + i`, so N = B * G; T is the (padded) completion length.

Departures from the paper's formula and deliberate choices (the defaults follow the authors'
training script and the framework it ran on, not the paper's prose):
- Aggregation is a token-mean over all unmasked completion tokens of the mini-batch
  (`sum(L * m) / sum(m)`), not the paper's per-sequence `1/|o_i|` mean. Micro-batches divide
  by the MINI-batch's normaliser (`loss_normalizer`), so gradient accumulation gives exactly
  the one-pass gradient (verl 0.6 averaged per micro-batch, which did not). The paper's
  per-sequence mean ("seq-mean-token-mean") and Dr. GRPO's constant normaliser
  ("seq-mean-token-sum-norm") are options.
- KL to the reference uses the k3 ("low_var_kl") estimator, added to the LOSS with weight
  `kl_coef` (0.01), not subtracted from the reward. k1 and k2 are options.
- Advantages use the unbiased (n-1) group std, with eps = 1e-6 added to the std (not under the
  square root). A group whose rewards are all equal gets exactly 0, by an explicit test rather
  than by relying on `0 / eps` (float rounding of the mean can leave a tiny nonzero residue).
- Dual clip at 3.0 for negative advantages (verl's default); `dual_clip=None` turns it off.
- The log-ratio is clamped to [-20, 20] before `exp`, and k3's log-ratio to [-20, 20] and its
  value to [-10, 10], so one wild token cannot produce inf or NaN.
- Masked positions are overwritten with zeros BEFORE any arithmetic, so whatever sits in the
  padding (even -inf or NaN log-probs) cannot reach the loss or the gradient.
- `old_logp`, `ref_logp` and `advantages` are detached inside: the gradient is the policy's
  only. (Passing a non-detached `old_logp = logp` would otherwise silently zero the gradient.)
- Half-precision inputs are computed in float32; float64 stays float64.
- The clip fraction counts tokens where the eps-clip branch is strictly the one taken; tokens
  capped by the dual clip are counted separately as `dual_clip_frac`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

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


LOG_RATIO_CLAMP = 20.0  # |log rho| and |log(ref/pi)| bound: exp(20) ~ 4.9e8 is still finite
KL_VALUE_CLAMP = 10.0  # per-token bound on the k3 estimate


# -- advantages ---------------------------------------------------------------------------


def _group_std(grouped: Tensor) -> Tensor:
    return grouped.std(dim=1, keepdim=True)  # (B, 1), unbiased


def _batch_std(grouped: Tensor) -> Tensor:
    return grouped.reshape(-1).std().expand(grouped.shape[0], 1)  # (B, 1), unbiased


def _no_std(grouped: Tensor) -> None:
    return None


ADVANTAGE_SCALES: dict[str, Callable[[Tensor], Tensor | None]] = {
    "group": _group_std,  # the paper: divide by each group's own std
    "batch": _batch_std,  # divide by the std of all rewards in the rollout batch
    "none": _no_std,  # Dr. GRPO: centre only
}


def group_advantages(
    rewards: Tensor, group_size: int, eps: float = 1e-6, scale: str = "group"
) -> Tensor:
    """Group-relative advantages: each reward minus its group's mean, over a std.

    Args:
        rewards: (N,) one scalar reward per completion, laid out group by group.
        group_size: G, completions per prompt; at least 2 (one completion has nothing to be
            compared with).
        eps: added to the std so a near-constant group does not blow up.
        scale: "group" (the paper, unbiased per-group std), "batch" (unbiased std of all N
            rewards) or "none" (Dr. GRPO: no division).

    Returns:
        (N,) advantages in the rewards' layout; exactly 0 for a group whose rewards are equal.

    Raises:
        ValueError: group_size < 2, N not a multiple of group_size, rewards not 1-D or not
            finite, or an unknown scale.
    """
    scale_fn = pick_variant(ADVANTAGE_SCALES, scale, "scale")
    if group_size < 2:
        raise ValueError(
            f"group_size is {group_size}; GRPO needs at least 2 completions per prompt "
            "(with one there is nothing to compare). Set group_size >= 2."
        )
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "expected B * group_size rewards laid out group by group"
        )
    if eps < 0:
        raise ValueError(f"eps is {eps}; expected eps >= 0")
    if not bool(torch.isfinite(rewards).all()):
        bad = torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()
        raise ValueError(f"rewards at indices {bad[:10]} are not finite; fix the reward function")
    grouped = rewards.detach().to(compute_dtype(rewards.dtype)).view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    std = scale_fn(grouped)  # (B, 1) or None
    advantages = centred if std is None else centred / (std + eps)  # (B, G)
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    return torch.where(constant, torch.zeros_like(advantages), advantages).reshape(-1)  # (N,)


# -- KL estimators ------------------------------------------------------------------------


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi - log pi_ref per token (unbiased, can be negative). (N, T) -> (N, T)."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log pi - log pi_ref)^2 per token (biased, low variance). (N, T) -> (N, T)."""
    return 0.5 * (logp - ref_logp).square()


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 with d = log pi_ref - log pi (unbiased, >= 0), clamped. (N, T).

    d is clamped to [-20, 20] and the value to [-10, 10], as verl's low_var_kl, so extreme
    log-ratios give a bounded, finite estimate (with zero gradient beyond the clamps).
    """
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(d) - d - 1.0).clamp(-KL_VALUE_CLAMP, KL_VALUE_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "low_var_kl": kl_k3,  # verl's name for k3
}


# -- clipped surrogate --------------------------------------------------------------------


def _check_clip_settings(
    clip_eps_low: float, clip_eps_high: float, dual_clip: float | None
) -> None:
    if not 0.0 <= clip_eps_low < 1.0:
        raise ValueError(f"clip_eps_low is {clip_eps_low}; expected 0 <= clip_eps_low < 1")
    if clip_eps_high < 0.0:
        raise ValueError(f"clip_eps_high is {clip_eps_high}; expected clip_eps_high >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip is {dual_clip}; expected a bound > 1 (3.0) or None (off)")


class _Surrogate(NamedTuple):
    loss: Tensor  # (N, T) per-token loss
    ratio: Tensor  # (N, T) clamped importance ratio
    clipped: Tensor  # (N, T) bool: eps-clip branch strictly taken
    dual_clipped: Tensor  # (N, T) bool: capped by the dual clip


def _surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None,
) -> _Surrogate:
    """The PPO/GRPO clipped objective per token, on already-checked inputs."""
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # (N, 1), broadcast over tokens
    log_ratio = (logp - old_logp.detach()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # (N, T)
    unclipped = -adv * ratio  # (N, T)
    clipped_loss = -adv * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)  # (N, T)
    clipped = clipped_loss > unclipped  # strict: on a tie the gradient-carrying branch wins
    loss = torch.where(clipped, clipped_loss, unclipped)  # = max(unclipped, clipped_loss)
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        cap = -adv * dual_clip  # (N, 1), constant: no gradient through a capped token
        dual_clipped = (adv < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap.expand_as(loss), loss)
    return _Surrogate(loss, ratio, clipped, dual_clipped)


def clipped_surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate loss `max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high))`.

    With `dual_clip` c, a token with A < 0 is further capped at `-A * c`, so a token whose ratio
    exploded cannot dominate the loss.

    Args:
        logp: (N, T) log-probs of the sampled tokens under the current policy.
        old_logp: (N, T) log-probs under the sampling policy (detached here).
        advantages: (N,) one advantage per completion, shared by all its tokens.
        clip_eps_low: ratios below 1 - clip_eps_low are clipped (when A < 0).
        clip_eps_high: ratios above 1 + clip_eps_high are clipped (when A > 0).
        dual_clip: the cap c for negative advantages, > 1; None turns it off.

    Returns:
        (per-token loss (N, T), clipped (N, T) bool: the clipped branch is strictly the one
        taken). No mask is applied.
    """
    _check_clip_settings(clip_eps_low, clip_eps_high, dual_clip)
    _check_tokens(logp, old_logp=old_logp)
    _check_advantages(advantages, logp.shape[0])
    dtype = compute_dtype(logp.dtype)
    result = _surrogate(
        logp.to(dtype), old_logp.to(dtype), advantages, clip_eps_low, clip_eps_high, dual_clip
    )
    return result.loss, result.clipped


# -- the loss -----------------------------------------------------------------------------


def _check_tokens(logp: Tensor, **others: Tensor | None) -> None:
    if logp.dim() != 2:
        raise ValueError(f"logp must be (N, T), got shape {tuple(logp.shape)}")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != logp.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logp has {tuple(logp.shape)}; "
                "all per-token tensors must be (N, T) over the same completion positions"
            )


def _check_advantages(advantages: Tensor, rows: int) -> None:
    if advantages.shape != (rows,):
        raise ValueError(
            f"advantages must be (N,) = ({rows},), one per completion; got shape "
            f"{tuple(advantages.shape)}"
        )


def _loss_stats(
    terms: _Surrogate, kl: Tensor | None, weights: Tensor, policy_loss: Tensor
) -> LossStats:
    """Detached sums over the unmasked tokens (`weights` 1), for logging and merging."""
    with torch.no_grad():
        keep = weights.bool()
        ratio = terms.ratio.detach()  # (N, T)
        inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)
        return LossStats(
            policy_loss=policy_loss,
            kl_sum=None if kl is None else (kl.detach() * weights).sum(),
            clipped=(terms.clipped & keep).to(weights.dtype).sum(),
            dual_clipped=(terms.dual_clipped & keep).to(weights.dtype).sum(),
            ratio_sum=torch.where(keep, ratio, torch.zeros_like(ratio)).sum(),
            ratio_min=torch.where(keep, ratio, inf).min(),
            ratio_max=torch.where(keep, ratio, -inf).max(),
            num_tokens=weights.sum(),
        )


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = 3.0,
    kl_coef: float = 0.01,
    kl_estimator: str = "k3",
    aggregation: str = "token-mean",
    loss_normalizer: float | None = None,
    max_completion_length: int | None = None,
) -> tuple[Tensor, LossStats]:
    """The GRPO loss: clipped surrogate plus `kl_coef` times KL, per token, aggregated.

    Args:
        logp: (N, T) current-policy log-probs of the sampled tokens (carries the gradient).
        old_logp: (N, T) sampling-policy log-probs (`logp.detach()` for a single update).
        ref_logp: (N, T) reference log-probs, or None when `kl_coef` is 0.
        advantages: (N,) per-completion advantages (`group_advantages`).
        mask: (N, T) 1 on completion tokens, 0 on padding and after EOS (bool or numeric).
        clip_eps_low, clip_eps_high, dual_clip: see `clipped_surrogate`.
        kl_coef: beta, the weight of the KL term; 0 needs no reference.
        kl_estimator: a key of `KL_ESTIMATORS`.
        aggregation: a key of `AGGREGATIONS`.
        loss_normalizer: replaces this call's own denominator. When one mini-batch is split
            into micro-batches for memory, pass `aggregation_normalizer(aggregation,
            minibatch_mask, max_completion_length)` to every micro-batch and backpropagate
            each loss: the summed gradients then equal the one-pass gradient exactly.
            (token-mean: the mini-batch's token count; seq-mean-token-mean: its number of
            non-empty sequences; seq-mean-token-sum-norm: its rows * max_completion_length.)
        max_completion_length: the generation budget, needed by "seq-mean-token-sum-norm".

    Returns:
        (loss, stats): the 0-dim loss, and a `LossStats` of detached sums (surrogate part of
        the loss, KL, clipped and dual-clipped tokens, ratio sum and extremes, token count) that
        merges with the other micro-batches of the mini-batch; `stats.as_dict()` gives the
        logged figures (token means and shares; `kl` only when `ref_logp` is given).
    """
    _check_tokens(logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    _check_advantages(advantages, logp.shape[0])
    _check_clip_settings(clip_eps_low, clip_eps_high, dual_clip)
    kl_fn = pick_variant(KL_ESTIMATORS, kl_estimator, "kl_estimator")
    aggregate = pick_variant(AGGREGATIONS, aggregation, "aggregation")
    if kl_coef < 0:
        raise ValueError(f"kl_coef is {kl_coef}; expected kl_coef >= 0")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(
            f"kl_coef is {kl_coef} but ref_logp is None; pass the reference log-probs or set "
            "kl_coef=0 to train without a KL term"
        )
    dtype = compute_dtype(logp.dtype)
    keep = mask.bool()  # (N, T)
    weights = keep.to(dtype)  # (N, T)

    def clean(x: Tensor) -> Tensor:  # zero the padding first: its values must never matter
        return torch.where(keep, x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))

    logp_c = clean(logp)  # (N, T)
    terms = _surrogate(
        logp_c, clean(old_logp.detach()), advantages, clip_eps_low, clip_eps_high, dual_clip
    )
    per_token = terms.loss  # (N, T)
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp_c, clean(ref_logp.detach()))  # (N, T)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    options = {"normalizer": loss_normalizer, "max_completion_length": max_completion_length}
    loss = aggregate(per_token, weights, **options)

    stats = _loss_stats(terms, kl, weights, aggregate(terms.loss.detach(), weights, **options))
    return loss, stats


# -- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    """How the GRPO loss and advantages are computed (defaults reproduce docs/method.md section 4).

    Attributes:
        clip_eps_low: lower clip range: ratios below 1 - clip_eps_low are clipped when A < 0.
        clip_eps_high: upper clip range: ratios above 1 + clip_eps_high are clipped when A > 0
            (DAPO's "clip-higher" uses a larger value, e.g. 0.28).
        dual_clip: cap on the loss of a token with A < 0, as a multiple of -A; null disables.
        kl_estimator: "k3" (low-variance, default), "k1", "k2" or "low_var_kl" (= k3).
        aggregation: "token-mean" (default), "seq-mean-token-mean" or "seq-mean-token-sum-norm".
        advantage_scale: "group" (the paper), "batch" or "none" (Dr. GRPO).
        advantage_eps: added to the std when scaling advantages.
        drop_zero_variance: leave the completions of groups whose rewards are all equal out of
            the loss, so that their tokens no longer count in the token-mean's denominator
            (their policy term is zero; their KL term goes with them). Off: the paper's loss.
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    advantage_scale: str = "group"
    advantage_eps: float = 1e-6
    drop_zero_variance: bool = False

    def __post_init__(self) -> None:
        _check_clip_settings(self.clip_eps_low, self.clip_eps_high, self.dual_clip)
        pick_variant(KL_ESTIMATORS, self.kl_estimator, "kl_estimator")
        pick_variant(AGGREGATIONS, self.aggregation, "aggregation")
        pick_variant(ADVANTAGE_SCALES, self.advantage_scale, "advantage_scale")
        if self.advantage_eps < 0:
            raise ValueError(f"advantage_eps is {self.advantage_eps}; expected >= 0")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `grpo_loss` that these settings fix."""
        return {
            "clip_eps_low": self.clip_eps_low,
            "clip_eps_high": self.clip_eps_high,
            "dual_clip": self.dual_clip,
            "kl_estimator": self.kl_estimator,
            "aggregation": self.aggregation,
        }


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
