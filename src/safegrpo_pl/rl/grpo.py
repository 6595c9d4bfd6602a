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

The field's variants (docs/method.md section 4.15), each off by default, and where they depart
from their reference (verl v0.7.0's `core_algos` unless said):
- Policy losses by name (`POLICY_LOSSES`: vanilla, gspo, cispo), all under our aggregation
  over the global mini-batch. GSPO clips in its own range (3e-4, 4e-4) and needs
  "seq-mean-token-mean", which verl imposes silently; it has no dual clip, nor has CISPO.
- Advantage estimators by name (`ADVANTAGE_ESTIMATORS`: grpo, rloo,
  reinforce_plus_plus_baseline); `advantage_scale` is grpo's only. REINFORCE++ whitens over
  tokens with eps 1e-8 under the root (verl's `masked_whiten`), so a constant group is not 0.
- The top-entropy mask takes its quantile over the tokens of one `grpo_loss` call (one
  micro-batch on one rank); dropped tokens add 0 but stay in the denominator.
- Rollout correction: truncated importance weights `min(pi_old / pi_sampler, cap)` on the
  policy term only (not on KL or entropy), as verl's `rollout_is_weights`.
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
        entropy_sum: sum of the policy's token entropy over unmasked tokens; None when the
            entropy was not computed.
        sampler_kl_sum: sum over unmasked tokens of the k3 estimate of KL(sampler || trainer)
            (`sampler_kl`); None without the sampler's log-probs.
    """

    policy_loss: Tensor
    kl_sum: Tensor | None
    clipped: Tensor
    dual_clipped: Tensor
    ratio_sum: Tensor
    ratio_min: Tensor
    ratio_max: Tensor
    num_tokens: Tensor
    entropy_sum: Tensor | None = None
    sampler_kl_sum: Tensor | None = None

    def merge(self, other: LossStats) -> LossStats:
        """The statistics of both calls together (sums of sums, max of maxima, min of minima)."""
        for name in ("kl_sum", "entropy_sum", "sampler_kl_sum"):
            if (getattr(self, name) is None) != (getattr(other, name) is None):
                raise ValueError(f"cannot merge loss statistics with and without {name}")
        return LossStats(
            policy_loss=self.policy_loss + other.policy_loss,
            kl_sum=_add_optional(self.kl_sum, other.kl_sum),
            clipped=self.clipped + other.clipped,
            dual_clipped=self.dual_clipped + other.dual_clipped,
            ratio_sum=self.ratio_sum + other.ratio_sum,
            ratio_min=torch.minimum(self.ratio_min, other.ratio_min),
            ratio_max=torch.maximum(self.ratio_max, other.ratio_max),
            num_tokens=self.num_tokens + other.num_tokens,
            entropy_sum=_add_optional(self.entropy_sum, other.entropy_sum),
            sampler_kl_sum=_add_optional(self.sampler_kl_sum, other.sampler_kl_sum),
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
        optional = {
            "kl": self.kl_sum,
            "entropy": self.entropy_sum,
            "sampler_kl": self.sampler_kl_sum,
        }
        for name, total in optional.items():
            if total is not None:
                figures[name] = _share(total, self.num_tokens)
        return figures


def _add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else a + b


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


def _check_rewards(rewards: Tensor, group_size: int, eps: float) -> None:
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


def _zero_constant_groups(grouped: Tensor, advantages: Tensor) -> Tensor:
    """(N,) `advantages` (B, G) flattened, exactly 0 in groups whose rewards are all equal."""
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (B, 1)
    return torch.where(constant, torch.zeros_like(advantages), advantages).reshape(-1)  # (N,)


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
    _check_rewards(rewards, group_size, eps)
    grouped = rewards.detach().to(compute_dtype(rewards.dtype)).view(-1, group_size)  # (B, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    std = scale_fn(grouped)  # (B, 1) or None
    advantages = centred if std is None else centred / (std + eps)  # (B, G)
    return _zero_constant_groups(grouped, advantages)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024): each reward minus the mean of the OTHER G-1 rewards.

    `A_i = r_i - (sum_g - r_i) / (G - 1)`, which is `G / (G - 1)` times the GRPO centring; no
    std. (N,) rewards group by group -> (N,), exactly 0 for a group whose rewards are equal.
    """
    _check_rewards(rewards, group_size, 0.0)
    grouped = rewards.detach().to(compute_dtype(rewards.dtype)).view(-1, group_size)  # (B, G)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # (B, G)
    return _zero_constant_groups(grouped, grouped - others)


WHITEN_EPS = 1e-8  # under the square root, as verl's masked_whiten


def reinforce_plus_plus_baseline_advantages(
    rewards: Tensor, lengths: Tensor, group_size: int
) -> Tensor:
    """REINFORCE++ with baseline (Hu et al. 2025): group-mean centring, then batch whitening.

    The centred rewards `c_i = r_i - mean_g` are whitened over the batch's TOKENS, each
    completion counting once per token (verl's `masked_whiten` over the response mask):
    `mu = sum(len_i c_i) / sum(len_i)`, `var = sum(len_i (c_i - mu)^2) / (sum(len_i) - 1)`,
    `A_i = (c_i - mu) / sqrt(var + 1e-8)`. A constant group gets `-mu / sqrt(var + 1e-8)`, not
    0: the whitening shifts every completion.

    Args:
        rewards: (N,) rewards of the whole rollout batch (every rank's), group by group.
        lengths: (N,) completion lengths in tokens (the weights of the whitening).
        group_size: G.

    Returns:
        (N,) advantages.
    """
    _check_rewards(rewards, group_size, 0.0)
    if lengths.shape != rewards.shape:
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)} but rewards has {tuple(rewards.shape)}"
        )
    dtype = compute_dtype(rewards.dtype)
    grouped = rewards.detach().to(dtype).view(-1, group_size)  # (B, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    weights = lengths.detach().to(dtype)  # (N,)
    tokens = weights.sum()
    if tokens < 2:
        raise ValueError(
            f"the rollout batch has {int(tokens)} completion tokens; whitening needs at least 2"
        )
    mean = (weights * centred).sum() / tokens
    var = (weights * (centred - mean).square()).sum() / (tokens - 1)  # unbiased over tokens
    return (centred - mean) * torch.rsqrt(var + WHITEN_EPS)


def _grpo_estimator(
    rewards: Tensor, lengths: Tensor, group_size: int, eps: float, scale: str
) -> Tensor:
    return group_advantages(rewards, group_size, eps, scale)


def _rloo_estimator(
    rewards: Tensor, lengths: Tensor, group_size: int, eps: float, scale: str
) -> Tensor:
    return rloo_advantages(rewards, group_size)


def _reinforce_pp_estimator(
    rewards: Tensor, lengths: Tensor, group_size: int, eps: float, scale: str
) -> Tensor:
    return reinforce_plus_plus_baseline_advantages(rewards, lengths, group_size)


# (rewards (N,), lengths (N,), group_size, eps, scale) -> advantages (N,)
ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor, int, float, str], Tensor]] = {
    "grpo": _grpo_estimator,  # the paper: `group_advantages` with `advantage_scale`
    "rloo": _rloo_estimator,  # leave-one-out baseline, no std
    "reinforce_plus_plus_baseline": _reinforce_pp_estimator,  # group centring, batch whitening
}


def estimate_advantages(
    rewards: Tensor,
    lengths: Tensor,
    group_size: int,
    *,
    estimator: str = "grpo",
    eps: float = 1e-6,
    scale: str = "group",
) -> Tensor:
    """(N,) advantages of the whole rollout batch with the named estimator.

    Args:
        rewards: (N,) rewards, group by group.
        lengths: (N,) completion lengths (read by "reinforce_plus_plus_baseline" only).
        group_size: G.
        estimator: a key of `ADVANTAGE_ESTIMATORS`.
        eps, scale: the "grpo" estimator's std offset and scaling (`group_advantages`).
    """
    return pick_variant(ADVANTAGE_ESTIMATORS, estimator, "advantage_estimator")(
        rewards, lengths, group_size, eps, scale
    )


def overlong_penalty(
    lengths: Tensor, max_new_tokens: int, buffer: int, factor: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to the reward.

    0 up to `max_new_tokens - buffer` tokens, then falling along a line to `-factor` at
    `max_new_tokens`: `min(-(len - (L_max - buffer)) / buffer * factor, 0)`.

    Args:
        lengths: (N,) completion lengths in tokens (EOS included).
        max_new_tokens: L_max, the generation budget.
        buffer: tokens before L_max over which the penalty grows (1 <= buffer <= L_max).
        factor: the penalty at L_max.

    Returns:
        (N,) penalties, <= 0, in float32 (or the lengths' float type).
    """
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(
            f"overlong_buffer is {buffer}; expected 1 <= buffer <= max_new_tokens "
            f"({max_new_tokens}), or 0 for no penalty"
        )
    exceed = lengths.to(compute_dtype(lengths.dtype)) - (max_new_tokens - buffer)  # (N,)
    return (-exceed / buffer * factor).clamp(max=0.0)


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


class PolicyTerms(NamedTuple):
    """What a policy loss gives per token, before masking and aggregation."""

    loss: Tensor  # (N, T) per-token loss, carrying the gradient
    ratio: Tensor  # (N, T) the importance ratio it used (logged: mean, min, max)
    clipped: Tensor  # (N, T) bool: the eps-clip acted on this token
    dual_clipped: Tensor  # (N, T) bool: capped by the dual clip


@dataclass(frozen=True)
class ClipRange:
    """The clip settings a policy loss reads.

    Attributes:
        low: ratios below 1 - low are clipped (when A < 0).
        high: ratios above 1 + high are clipped (when A > 0).
        dual: the dual-clip cap for A < 0 (a multiple of -A), or None.
    """

    low: float
    high: float
    dual: float | None


def _surrogate(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None,
) -> PolicyTerms:
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
    return PolicyTerms(loss, ratio, clipped, dual_clipped)


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


# -- policy losses ------------------------------------------------------------------------
#
# A policy loss maps (logp (N, T), old_logp (N, T), advantages (N,), weights (N, T) float 0/1,
# clip: ClipRange) to `PolicyTerms`. Its inputs are already checked, in the compute dtype, and
# zero on masked positions; old_logp and advantages carry no gradient. `grpo_loss` masks and
# aggregates what it returns and adds the KL and entropy terms. To add one, write the function
# and add it to POLICY_LOSSES (docs/method.md section 4.15).

SEQUENCE_LOG_RATIO_MAX = 10.0  # GSPO: upper clamp of the sequence log-ratio (verl's)


def vanilla_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, clip: ClipRange
) -> PolicyTerms:
    """PPO's clipped surrogate with the dual clip, per token (`clipped_surrogate`)."""
    return _surrogate(logp, old_logp, advantages, clip.low, clip.high, clip.dual)


def gspo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, clip: ClipRange
) -> PolicyTerms:
    """GSPO (Zheng et al. 2025), in its token form "GSPO-token": one ratio per sequence.

    `s_i = exp(mean over the sequence's tokens of (logp - old_logp))`, the geometric mean of
    the token ratios. Per token, `s_it = sg[s_i] * pi_t / sg[pi_t]`: its value is `s_i`, its
    gradient the token's own log-prob times `s_i`. Loss `max(-A s_it, -A clip(s_it, 1 - low,
    1 + high))`; no dual clip. The log of `s_it` is clamped above at 10, as verl does. The paper
    weighs each sequence equally (aggregation "seq-mean-token-mean", which `LossSettings`
    requires) and clips in a far narrower range than PPO (3e-4, 4e-4).
    """
    adv = advantages.unsqueeze(1)  # (N, 1)
    token_log_ratio = (logp - old_logp) * weights  # (N, T)
    lengths = weights.sum(1).clamp(min=1.0)  # (N,)
    sequence_log_ratio = token_log_ratio.sum(1) / lengths  # (N,)
    log_ratio = logp - logp.detach() + sequence_log_ratio.detach().unsqueeze(1)  # (N, T)
    ratio = torch.exp(log_ratio.clamp(max=SEQUENCE_LOG_RATIO_MAX))  # (N, T)
    unclipped = -adv * ratio
    clipped_loss = -adv * ratio.clamp(1.0 - clip.low, 1.0 + clip.high)
    clipped = clipped_loss > unclipped
    loss = torch.where(clipped, clipped_loss, unclipped)
    return PolicyTerms(loss, ratio, clipped, torch.zeros_like(clipped))


def cispo_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, weights: Tensor, clip: ClipRange
) -> PolicyTerms:
    """CISPO (MiniMax-M1, 2025): a clipped, stop-gradient importance weight on REINFORCE.

    Loss `-sg[clip(rho, 1 - low, 1 + high)] * A * logp` per token: every token keeps a
    gradient (PPO's clip drops the clipped tokens' gradient), only its weight is bounded. The
    paper bounds the weight from above only (a large `low`); no dual clip. `clipped` marks the
    tokens whose weight was changed by the clip, on either side (verl's clip fraction).
    """
    adv = advantages.unsqueeze(1)  # (N, 1)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (N, T)
    weight = ratio.clamp(1.0 - clip.low, 1.0 + clip.high).detach()  # (N, T)
    loss = -weight * adv * logp
    clipped = weight != ratio.detach()
    return PolicyTerms(loss, ratio, clipped, torch.zeros_like(clipped))


PolicyLoss = Callable[[Tensor, Tensor, Tensor, Tensor, ClipRange], PolicyTerms]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "vanilla": vanilla_policy_loss,  # the paper: PPO clip + dual clip, token ratios
    "gspo": gspo_policy_loss,  # sequence-level ratio, token-level gradient
    "cispo": cispo_policy_loss,  # clipped stop-gradient IS weight times log-prob
}


# -- sampler/trainer mismatch, entropy ------------------------------------------------------


def _rollout_is_token(log_ratio: Tensor, weights: Tensor) -> Tensor:
    return log_ratio  # (N, T)


def _rollout_is_sequence(log_ratio: Tensor, weights: Tensor) -> Tensor:
    return (log_ratio * weights).sum(1, keepdim=True).expand_as(log_ratio)  # (N, T)


# (log(pi_old / pi_sampler) (N, T), weights (N, T)) -> the log of the weight before the cap
ROLLOUT_IS_LEVELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": _rollout_is_token,  # one weight per token: biased, low variance
    "sequence": _rollout_is_sequence,  # the product over the sequence: unbiased, high variance
}


def rollout_correction_weights(
    old_logp: Tensor, sampler_logp: Tensor, weights: Tensor, level: str, cap: float
) -> Tensor:
    """Truncated importance weights `min(pi_old / pi_sampler, cap)` (verl's rollout_correction).

    The sampler (the decode loop, maybe in lower precision or other kernels) and the trainer's
    old pass compute the same policy's log-probs differently; the tokens were drawn from the
    sampler's, so the policy loss is reweighted by their ratio, truncated at `cap` (TIS).

    Args:
        old_logp: (N, T) the trainer's old log-probs.
        sampler_logp: (N, T) the sampler's log-probs of the same tokens.
        weights: (N, T) float 0/1 loss tokens.
        level: "token" (a weight per token) or "sequence" (exp of the summed log-ratio).
        cap: the truncation, > 0.

    Returns:
        (N, T) detached weights, 0 on masked positions. The log-ratio is clamped to [-20, 20]
        before `exp`.
    """
    if not cap > 0:
        raise ValueError(f"rollout_is_cap is {cap}; expected > 0 (2.0 is verl's default)")
    log_ratio = pick_variant(ROLLOUT_IS_LEVELS, level, "rollout_is")(
        (old_logp - sampler_logp).detach(), weights
    )
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))  # (N, T)
    return (ratio * weights).clamp(max=cap)


def sampler_kl_k3(old_logp: Tensor, sampler_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(sampler || trainer) on tokens drawn by the sampler: (N, T).

    With `d = log pi_old - log pi_sampler` (clamped to [-20, 20]): `exp(d) - d - 1` >= 0.
    """
    d = (old_logp - sampler_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def high_entropy_tokens(entropy: Tensor, weights: Tensor, quantile: float) -> Tensor:
    """(N, T) bool: the loss tokens whose entropy is at least the `quantile` of theirs.

    The "80/20 rule" (Wang et al. 2025): with quantile 0.8 only the ~20% highest-entropy
    tokens ("forking tokens") keep their gradient. The quantile interpolates linearly between
    order statistics (`torch.quantile`), over the tokens of this call.
    """
    keep = weights.bool()  # (N, T)
    values = entropy.detach()[keep]  # (M,)
    if values.numel() == 0:
        return keep
    threshold = torch.quantile(values.to(torch.float64), quantile).to(entropy.dtype)
    return keep & (entropy.detach() >= threshold)


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
    terms: PolicyTerms,
    kl: Tensor | None,
    weights: Tensor,
    policy_loss: Tensor,
    entropy: Tensor | None = None,
    sampler_kl: Tensor | None = None,
) -> LossStats:
    """Detached sums over the unmasked tokens (`weights` 1), for logging and merging."""
    with torch.no_grad():
        keep = weights.bool()
        ratio = terms.ratio.detach()  # (N, T)
        inf = torch.tensor(float("inf"), dtype=ratio.dtype, device=ratio.device)

        def total(x: Tensor | None) -> Tensor | None:
            return None if x is None else (x.detach() * weights).sum()

        return LossStats(
            policy_loss=policy_loss,
            kl_sum=total(kl),
            clipped=(terms.clipped & keep).to(weights.dtype).sum(),
            dual_clipped=(terms.dual_clipped & keep).to(weights.dtype).sum(),
            ratio_sum=torch.where(keep, ratio, torch.zeros_like(ratio)).sum(),
            ratio_min=torch.where(keep, ratio, inf).min(),
            ratio_max=torch.where(keep, ratio, -inf).max(),
            num_tokens=weights.sum(),
            entropy_sum=total(entropy),
            sampler_kl_sum=total(sampler_kl),
        )


def _check_entropy_settings(entropy_coef: float, entropy_quantile: float | None) -> None:
    if entropy_coef < 0:
        raise ValueError(f"entropy_coef is {entropy_coef}; expected >= 0 (0 = no bonus)")
    if entropy_quantile is not None and not 0.0 <= entropy_quantile < 1.0:
        raise ValueError(
            f"entropy_quantile is {entropy_quantile}; expected 0 <= q < 1 (0.8 keeps the top "
            "20% highest-entropy tokens) or None"
        )


def _check_variant_inputs(
    entropy: Tensor | None,
    entropy_coef: float,
    entropy_quantile: float | None,
    sampler_logp: Tensor | None,
    rollout_is: str | None,
) -> None:
    _check_entropy_settings(entropy_coef, entropy_quantile)
    if entropy is None and (entropy_coef > 0 or entropy_quantile is not None):
        raise ValueError("entropy_coef and entropy_quantile need the per-token entropy; pass it")
    if rollout_is is not None:
        pick_variant(ROLLOUT_IS_LEVELS, rollout_is, "rollout_is")
        if sampler_logp is None:
            raise ValueError(
                f"rollout_is is {rollout_is!r} but sampler_logp is None; pass the sampler's "
                "log-probs (Rollout.sampler_logp) or set rollout_is to None"
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
    policy_loss: str = "vanilla",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_quantile: float | None = None,
    sampler_logp: Tensor | None = None,
    rollout_is: str | None = None,
    rollout_is_cap: float = 2.0,
) -> tuple[Tensor, LossStats]:
    """The GRPO loss: a policy loss plus `kl_coef` times KL, per token, aggregated.

    Args:
        logp: (N, T) current-policy log-probs of the sampled tokens (carries the gradient).
        old_logp: (N, T) sampling-policy log-probs (`logp.detach()` for a single update).
        ref_logp: (N, T) reference log-probs, or None when `kl_coef` is 0.
        advantages: (N,) per-completion advantages (`group_advantages`).
        mask: (N, T) 1 on completion tokens, 0 on padding and after EOS (bool or numeric).
        clip_eps_low, clip_eps_high, dual_clip: the policy loss's `ClipRange` (see
            `clipped_surrogate`).
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
        policy_loss: a key of `POLICY_LOSSES` ("vanilla": the paper's).
        entropy: (N, T) the policy's token entropy (carries the gradient when `entropy_coef`
            > 0); logged as `entropy` when given.
        entropy_coef: weight of the entropy bonus: `- entropy_coef * H` per token.
        entropy_quantile: keep only the loss tokens whose entropy is at least this quantile
            of this call's loss tokens (`high_entropy_tokens`); the others add 0 to the loss
            but stay in its denominator. None keeps every token.
        sampler_logp: (N, T) the sampler's log-probs of the tokens; when given, `sampler_kl`
            is logged.
        rollout_is: "token" or "sequence": multiply the policy loss by the truncated
            importance weights `rollout_correction_weights` (None: no correction).
        rollout_is_cap: the truncation of those weights.

    Returns:
        (loss, stats): the 0-dim loss, and a `LossStats` of detached sums (policy part of the
        loss, KL, clipped and dual-clipped tokens, ratio sum and extremes, token count, entropy
        and sampler KL when given) that merges with the other micro-batches of the mini-batch;
        `stats.as_dict()` gives the logged figures (token means and shares).
    """
    _check_tokens(
        logp,
        old_logp=old_logp,
        ref_logp=ref_logp,
        mask=mask,
        entropy=entropy,
        sampler_logp=sampler_logp,
    )
    _check_advantages(advantages, logp.shape[0])
    _check_clip_settings(clip_eps_low, clip_eps_high, dual_clip)
    _check_variant_inputs(entropy, entropy_coef, entropy_quantile, sampler_logp, rollout_is)
    policy_fn = pick_variant(POLICY_LOSSES, policy_loss, "policy_loss")
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
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def clean(x: Tensor) -> Tensor:  # zero the padding first: its values must never matter
        return torch.where(keep, x.to(dtype), zero.to(x.device))

    logp_c = clean(logp)  # (N, T)
    old_c = clean(old_logp.detach())  # (N, T)
    clip = ClipRange(clip_eps_low, clip_eps_high, dual_clip)
    terms = policy_fn(logp_c, old_c, advantages.detach().to(dtype), weights, clip)
    policy = terms.loss  # (N, T)
    sampler_c = None if sampler_logp is None else clean(sampler_logp.detach())
    if rollout_is is not None:
        correction = rollout_correction_weights(
            old_c, sampler_c, weights, rollout_is, rollout_is_cap
        )
        policy = policy * correction
    entropy_c = None if entropy is None else clean(entropy)
    chosen = None
    if entropy_quantile is not None:
        chosen = high_entropy_tokens(entropy_c, weights, entropy_quantile)  # (N, T) bool
        policy = torch.where(chosen, policy, zero)
    per_token = policy
    kl = None
    if ref_logp is not None:
        kl = kl_fn(logp_c, clean(ref_logp.detach()))  # (N, T)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if entropy_coef > 0:
        per_token = per_token - entropy_coef * entropy_c
    if chosen is not None:
        per_token = torch.where(chosen, per_token, zero)  # the KL and entropy terms too
    options = {"normalizer": loss_normalizer, "max_completion_length": max_completion_length}
    loss = aggregate(per_token, weights, **options)

    policy_part = aggregate(policy.detach(), weights, **options)
    sampler_kl = None if sampler_c is None else sampler_kl_k3(old_c, sampler_c)
    stats = _loss_stats(terms, kl, weights, policy_part, entropy_c, sampler_kl)
    return loss, stats


# -- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    """How the GRPO loss and advantages are computed (defaults reproduce docs/method.md section 4).

    Every option past `drop_zero_variance` is a variant of the field's (docs/method.md 4.15),
    off by default.

    Attributes:
        clip_eps_low: lower clip range: ratios below 1 - clip_eps_low are clipped when A < 0.
        clip_eps_high: upper clip range: ratios above 1 + clip_eps_high are clipped when A > 0
            (DAPO's "clip-higher" uses a larger value, e.g. 0.28).
        dual_clip: cap on the loss of a token with A < 0, as a multiple of -A; null disables
            (read by the vanilla loss only).
        kl_estimator: "k3" (low-variance, default), "k1", "k2" or "low_var_kl" (= k3).
        aggregation: "token-mean" (default), "seq-mean-token-mean" or "seq-mean-token-sum-norm".
        advantage_scale: "group" (the paper), "batch" or "none" (Dr. GRPO); the "grpo"
            estimator's only.
        advantage_eps: added to the std when scaling advantages.
        drop_zero_variance: leave the completions of groups whose rewards are all equal out of
            the loss, so that their tokens no longer count in the token-mean's denominator
            (their policy term is zero; their KL term goes with them). Off: the paper's loss.
        policy_loss: "vanilla" (the paper: PPO clip and dual clip), "gspo" (sequence-level
            ratio; needs aggregation "seq-mean-token-mean") or "cispo" (clipped stop-gradient
            weight on REINFORCE), or a name added to `POLICY_LOSSES`.
        gspo_clip_eps_low: GSPO's lower clip range for its sequence-level ratio (the paper:
            3e-4); GSPO reads these instead of clip_eps_low / clip_eps_high.
        gspo_clip_eps_high: GSPO's upper clip range (the paper: 4e-4).
        advantage_estimator: "grpo" (the paper), "rloo" (leave-one-out baseline) or
            "reinforce_plus_plus_baseline" (group centring, then whitening over the batch).
        entropy_coef: weight of an entropy bonus in the loss (- entropy_coef * H per token);
            0: none (`train/entropy` is logged either way).
        entropy_quantile: keep only the tokens whose entropy is at least this quantile of the
            micro-batch's loss tokens (0.8: the "80/20 rule", the top 20%); null: every token.
        mask_truncated: leave completions cut by max_new_tokens out of the loss.
        overlong_buffer: DAPO's soft overlong penalty: over the last `overlong_buffer` tokens
            before max_new_tokens the reward falls linearly, to -overlong_penalty_factor at the
            limit (logged as `train/overlong_penalty`); 0: none.
        overlong_penalty_factor: the penalty at max_new_tokens.
        log_sampler_kl: keep the sampler's per-token log-probs while decoding and log
            `train/sampler_kl`, the k3 estimate of KL(sampler || trainer's old pass); on
            whenever rollout_is is set.
        rollout_is: correct the sampler/trainer mismatch with truncated importance weights
            min(pi_old / pi_sampler, rollout_is_cap) on the policy loss: "token" or
            "sequence" (verl's rollout_correction); null: none.
        rollout_is_cap: the truncation of those weights.
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"
    advantage_scale: str = "group"
    advantage_eps: float = 1e-6
    drop_zero_variance: bool = False
    policy_loss: str = "vanilla"
    gspo_clip_eps_low: float = 3e-4
    gspo_clip_eps_high: float = 4e-4
    advantage_estimator: str = "grpo"
    entropy_coef: float = 0.0
    entropy_quantile: float | None = None
    mask_truncated: bool = False
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0
    log_sampler_kl: bool = False
    rollout_is: str | None = None
    rollout_is_cap: float = 2.0

    def __post_init__(self) -> None:
        _check_clip_settings(self.clip_eps_low, self.clip_eps_high, self.dual_clip)
        _check_clip_settings(self.gspo_clip_eps_low, self.gspo_clip_eps_high, None)
        pick_variant(KL_ESTIMATORS, self.kl_estimator, "kl_estimator")
        pick_variant(AGGREGATIONS, self.aggregation, "aggregation")
        pick_variant(ADVANTAGE_SCALES, self.advantage_scale, "advantage_scale")
        pick_variant(POLICY_LOSSES, self.policy_loss, "policy_loss")
        pick_variant(ADVANTAGE_ESTIMATORS, self.advantage_estimator, "advantage_estimator")
        if self.advantage_eps < 0:
            raise ValueError(f"advantage_eps is {self.advantage_eps}; expected >= 0")
        if self.policy_loss == "gspo" and self.aggregation != "seq-mean-token-mean":
            raise ValueError(
                f"policy_loss is 'gspo' but aggregation is {self.aggregation!r}; GSPO weighs "
                "each sequence equally (the paper, and verl): set model.loss.aggregation: "
                "seq-mean-token-mean"
            )
        if self.advantage_estimator != "grpo" and self.advantage_scale != "group":
            raise ValueError(
                f"advantage_scale is {self.advantage_scale!r} but advantage_estimator is "
                f"{self.advantage_estimator!r}, which does not read it; leave advantage_scale "
                "at 'group' or use advantage_estimator: grpo"
            )
        if self.overlong_buffer < 0:
            raise ValueError(f"overlong_buffer is {self.overlong_buffer}; expected >= 0 (0: off)")
        _check_entropy_settings(self.entropy_coef, self.entropy_quantile)
        if self.rollout_is is not None:
            pick_variant(ROLLOUT_IS_LEVELS, self.rollout_is, "rollout_is")
        if not self.rollout_is_cap > 0:
            raise ValueError(f"rollout_is_cap is {self.rollout_is_cap}; expected > 0")

    @property
    def needs_entropy_grad(self) -> bool:
        """Whether the training forward must give the entropy with its gradient."""
        return self.entropy_coef > 0

    @property
    def keeps_sampler_logprobs(self) -> bool:
        """Whether sampling must keep its per-token log-probs (`log_sampler_kl`, `rollout_is`)."""
        return self.log_sampler_kl or self.rollout_is is not None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `grpo_loss` that these settings fix."""
        gspo = self.policy_loss == "gspo"  # GSPO clips its sequence ratio in its own range
        return {
            "clip_eps_low": self.gspo_clip_eps_low if gspo else self.clip_eps_low,
            "clip_eps_high": self.gspo_clip_eps_high if gspo else self.clip_eps_high,
            "dual_clip": None if gspo else self.dual_clip,
            "kl_estimator": self.kl_estimator,
            "aggregation": self.aggregation,
            "policy_loss": self.policy_loss,
            "entropy_coef": self.entropy_coef,
            "entropy_quantile": self.entropy_quantile,
            "rollout_is": self.rollout_is,
            "rollout_is_cap": self.rollout_is_cap,
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


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) bool: the groups whose G rewards are not all equal, the only ones with a nonzero
    advantage. Exact equality, not `std > 0` as verl's filter: the float rounding of a mean
    must not keep a constant group.

    Args:
        rewards: (N,) = (B * G,) rewards, group by group.
        group_size: G.
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    return (grouped != grouped[:, :1]).any(dim=1)


@dataclass(frozen=True)
class DynamicSampling:
    """DAPO's dynamic sampling (docs/method.md section 4.16): groups whose rewards are all
    equal are dropped, and more rollout batches are drawn until each process holds a rollout
    batch of informative groups (the surplus of the last draw is discarded), or until the
    draw cap; then one update runs on what is held.

    Attributes:
        max_extra_draws: rollout batches drawn beyond the first before the update runs on the
            informative groups held, even if fewer than a rollout batch (verl's
            `max_num_gen_batches` minus 1, where verl stops the run instead); 0: no extra
            draw, the update trains on the first batch's informative groups only.
    """

    max_extra_draws: int = 2

    def __post_init__(self) -> None:
        if self.max_extra_draws < 0:
            raise ValueError(
                f"dynamic_sampling.max_extra_draws is {self.max_extra_draws}; expected >= 0 "
                "(an unbounded number of draws could loop for ever on a converged policy)"
            )


def groups_to_hold(informative: Tensor, room: int) -> list[int]:
    """The indexes of the informative groups of one draw, in order, at most `room` of them
    (the trim to the rollout batch: the first ones are kept, as verl keeps the first).

    Args:
        informative: (B,) bool, `informative_groups` of the draw.
        room: how many more groups the held batch takes.
    """
    return torch.nonzero(informative).flatten().tolist()[: max(room, 0)]


def loss_mask(
    completion_mask: Tensor,
    rewards: Tensor,
    group_size: int,
    drop_zero_variance: bool,
    truncated: Tensor | None = None,
) -> Tensor:
    """The (N, T) tokens the loss counts: every completion token, or with `drop_zero_variance`
    only those of groups whose rewards are not all equal (`LossSettings.drop_zero_variance`),
    and with `truncated` ((N,) bool: `LossSettings.mask_truncated`) none of the cut ones."""
    mask = completion_mask
    if drop_zero_variance:
        informative = informative_groups(rewards, group_size)  # (B,)
        keep = informative.repeat_interleave(group_size).to(completion_mask.dtype)  # (N,)
        mask = mask * keep[:, None]
    if truncated is not None:
        mask = mask * (~truncated.bool()).to(mask.dtype)[:, None]
    return mask


def repeat_per_completion(values: Sequence[str], group_size: int) -> list[str]:
    """One entry per completion from one per prompt (each repeated G times, in row order)."""
    return [value for value in values for _ in range(group_size)]
