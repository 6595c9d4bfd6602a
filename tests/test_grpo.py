"""GRPO math (docs/method.md section 4): advantages, KL estimators, clipped surrogate, aggregation, loss.

All hand examples run in float64 so that `atol=1e-6, rtol=0` is a real check, not a loose one.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from safegrpo_pl.rl.grpo import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    LossSettings,
    aggregation_normalizer,
    clipped_surrogate,
    group_advantages,
    grpo_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
)

F64 = torch.float64
EXACT = {"atol": 1e-6, "rtol": 0.0}


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _tokens_with_ratios(ratios: list[float], old: float = -1.0) -> tuple[torch.Tensor, ...]:
    """One row per ratio, T=1: logp = old + log(ratio), so exp(logp - old) = ratio."""
    old_logp = torch.full((len(ratios), 1), old, dtype=F64)
    logp = (old_logp + t(ratios).log().unsqueeze(1)).requires_grad_(True)
    return logp, old_logp


# -- advantages ---------------------------------------------------------------------------


def test_hand_example_two_groups_advantages():
    # group 0: [1, 0, 0.5], mean 0.5, deviations [0.5, -0.5, 0],
    #   unbiased var (0.25 + 0.25 + 0) / 2 = 0.25, std 0.5 -> A = dev / 0.500001
    # group 1: [0.25, 0.25, 1], mean 0.5, deviations [-0.25, -0.25, 0.5],
    #   unbiased var (0.0625 + 0.0625 + 0.25) / 2 = 0.1875, std sqrt(0.1875) = 0.4330127
    rewards = t([1.0, 0.0, 0.5, 0.25, 0.25, 1.0])
    s1 = math.sqrt(0.1875) + 1e-6
    expected = t([0.5 / 0.500001, -0.5 / 0.500001, 0.0, -0.25 / s1, -0.25 / s1, 0.5 / s1])
    # numerically: [0.999998, -0.999998, 0, -0.5773490, -0.5773490, 1.1546980]
    got = group_advantages(rewards, group_size=3)
    torch.testing.assert_close(
        got, expected, **EXACT, msg="advantages off the formula of docs/method.md section 4.2"
    )


def test_vectorised_advantages_match_a_python_loop():
    gen = torch.Generator().manual_seed(0)
    for group_size, groups in [(2, 5), (3, 4), (8, 16)]:
        # discrete rewards (the rule reward's values) make some groups constant on purpose
        levels = t([0.0, 0.25, 0.375, 0.5, 0.75, 0.875, 1.0])
        rewards = levels[torch.randint(0, len(levels), (group_size * groups,), generator=gen)]
        expected = []
        for g in range(groups):
            group = rewards[g * group_size : (g + 1) * group_size].tolist()
            mean, std = statistics.mean(group), statistics.stdev(group)  # stdev is n-1
            same = len(set(group)) == 1
            expected += [0.0 if same else (r - mean) / (std + 1e-6) for r in group]
        got = group_advantages(rewards, group_size)
        torch.testing.assert_close(
            got, t(expected), **EXACT, msg=f"vectorised != loop for G={group_size}"
        )


def test_zero_variance_group_gets_exactly_zero_advantage():
    # 0.1 is not exact in binary; the float mean of eight 0.1s can differ from 0.1 by an ulp,
    # which would give a tiny nonzero (r - mean) / (0 + eps): it must be exactly 0 instead.
    rewards = t([0.1] * 8 + [1.0, 0.0] * 4, dtype=torch.float32)
    got = group_advantages(rewards, group_size=8)
    assert torch.isfinite(got).all(), "constant group produced NaN/inf"
    assert (got[:8] == 0).all(), f"constant group must get exactly 0, got {got[:8].tolist()}"
    assert (got[8:] != 0).all(), "the varied group must keep nonzero advantages"


def test_group_size_one_raises():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(t([1.0, 0.0]), group_size=1)


def test_rewards_not_a_multiple_of_group_size_raise():
    with pytest.raises(ValueError, match="not a multiple of group_size=3"):
        group_advantages(t([1.0, 0.0, 0.5, 1.0]), group_size=3)


def test_batch_scale_divides_by_the_batch_std():
    # rewards [1, 0, 0.5 | 0.5, 0.5, 0.5]: batch mean 0.5, deviations [0.5, -0.5, 0, 0, 0, 0],
    # unbiased batch var 0.5 / 5 = 0.1, std 0.3162278; group 1 is constant -> 0
    rewards = t([1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    s = math.sqrt(0.1) + 1e-6
    expected = t([0.5 / s, -0.5 / s, 0.0, 0.0, 0.0, 0.0])  # [1.581134, -1.581134, 0, 0, 0, 0]
    got = group_advantages(rewards, 3, scale="batch")
    torch.testing.assert_close(got, expected, **EXACT, msg="batch scale must use the batch std")


def test_none_scale_only_centres():
    # Dr. GRPO: A = r - group mean: [1, 0, 0.5] - 0.5 and [0.25, 0.25, 1] - 0.5
    rewards = t([1.0, 0.0, 0.5, 0.25, 0.25, 1.0])
    expected = t([0.5, -0.5, 0.0, -0.25, -0.25, 0.5])
    got = group_advantages(rewards, 3, scale="none")
    torch.testing.assert_close(got, expected, **EXACT, msg="'none' must not divide by a std")


# -- surrogate, clipping, gradients -------------------------------------------------------


def test_surrogate_gradient_at_ratio_one_is_minus_advantage_over_token_count():
    # token-mean loss = sum(-A * rho * m) / sum(m); d/dlogp at rho = 1 is -A * m / sum(m)
    advantages = t([1.5, -0.5])
    mask = t([[1, 1, 1], [1, 0, 0]])  # sum(m) = 4
    logp = torch.full((2, 3), -0.7, dtype=F64, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), None, advantages, mask, kl_coef=0.0)
    loss.backward()
    expected = -advantages.unsqueeze(1) * mask / 4  # [[-0.375]*3, [0.125, 0, 0]]
    torch.testing.assert_close(logp.grad, expected, **EXACT, msg="policy gradient off -A*m/sum(m)")


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_masked_tokens_change_neither_loss_nor_gradient(kl_estimator):
    gen = torch.Generator().manual_seed(1)
    mask = t([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    advantages = t([0.8, -1.1, 0.3])
    base = -torch.rand(3, 4, generator=gen, dtype=F64) - 0.5
    old, ref = base + 0.05, base - 0.1

    def run(logp_values, old_values, ref_values):
        logp = logp_values.clone().requires_grad_(True)
        loss, _ = grpo_loss(
            logp, old_values, ref_values, advantages, mask, kl_coef=0.1, kl_estimator=kl_estimator
        )
        loss.backward()
        return loss.detach(), logp.grad

    loss_a, grad_a = run(base, old, ref)
    wild = torch.tensor([1e4, -1e4, math.inf, -math.inf, math.nan], dtype=F64)
    padding = ~mask.bool()
    fill = wild[torch.arange(int(padding.sum())) % len(wild)]

    def scramble(x):
        return x.masked_scatter(padding, fill)

    loss_b, grad_b = run(scramble(base), scramble(old), scramble(ref))
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0, msg="padding leaked into loss")
    torch.testing.assert_close(
        grad_b[mask.bool()], grad_a[mask.bool()], atol=0, rtol=0, msg="padding changed grads"
    )
    assert (grad_b[padding] == 0).all(), f"masked grads must be exactly 0: {grad_b[padding]}"


@pytest.mark.parametrize(("eps_low", "eps_high"), [(0.2, 0.2), (0.1, 0.28)])
def test_clipping_engages_only_outside_the_range_on_the_side_of_the_advantage(eps_low, eps_high):
    lo, hi = 1 - eps_low, 1 + eps_high
    ratios = [0.5, lo - 0.01, lo + 0.01, 1.0, hi - 0.01, hi + 0.01, 2.0]
    for advantage, expect in [
        (1.0, [False, False, False, False, False, True, True]),  # A>0: only above 1+eps_high
        (-1.0, [True, True, False, False, False, False, False]),  # A<0: only below 1-eps_low
    ]:
        logp, old = _tokens_with_ratios(ratios)
        adv = torch.full((len(ratios),), advantage, dtype=F64)
        loss, clipped = clipped_surrogate(
            logp, old, adv, clip_eps_low=eps_low, clip_eps_high=eps_high, dual_clip=None
        )
        assert clipped.squeeze(1).tolist() == expect, f"clip mask wrong for A={advantage}"
        loss.sum().backward()
        grad = logp.grad.squeeze(1)
        # clipped: loss is the constant -A*(1±eps) -> gradient 0; else d(-A*rho)/dlogp = -A*rho
        want = torch.where(t(expect).bool(), t(0.0), -advantage * t(ratios))
        torch.testing.assert_close(grad, want, **EXACT, msg="gradient must vanish where clipped")


def test_dual_clip_bounds_negative_advantage_loss_and_none_disables_it():
    # A = -2, rho = e^10 = 22026.47: unclipped branch -A*rho = 44052.93 beats -A*1.2 = 2.4;
    # the dual clip caps it at -A*3 = 6 (gradient 0); without it the loss stays 44052.93
    logp, old = _tokens_with_ratios([math.exp(10.0)])
    adv = t([-2.0])
    capped, _ = clipped_surrogate(logp, old, adv, dual_clip=3.0)
    torch.testing.assert_close(capped, t([[6.0]]), **EXACT, msg="dual clip must cap at -A*3")
    capped.sum().backward()
    assert logp.grad.item() == 0.0, "a dual-clipped token must carry no gradient"
    free, _ = clipped_surrogate(logp, old, adv, dual_clip=None)
    torch.testing.assert_close(
        free, t([[2.0 * math.exp(10.0)]]), atol=1e-6, rtol=1e-12, msg="dual_clip=None must not cap"
    )


def test_log_ratio_clamp_keeps_an_exploded_ratio_finite():
    # log-ratio 1e4 is clamped to 20: rho = e^20 = 4.85e8, loss -A*rho finite for A = 1
    logp = torch.tensor([[1e4]], dtype=torch.float32, requires_grad=True)
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([1.0]), dual_clip=None)
    assert torch.isfinite(loss).all(), "ratio overflowed to inf"
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all(), "gradient of an exploded ratio is not finite"


# -- KL estimators ------------------------------------------------------------------------


def test_kl_estimators_at_hand_points():
    logp, ref = t([[-1.0, -2.0, -0.5]]), t([[-2.0, -1.0, -0.5]])
    # logp - ref = [1, -1, 0]
    torch.testing.assert_close(kl_k1(logp, ref), t([[1.0, -1.0, 0.0]]), **EXACT, msg="k1")
    # 0.5 * [1, 1, 0]
    torch.testing.assert_close(kl_k2(logp, ref), t([[0.5, 0.5, 0.0]]), **EXACT, msg="k2")
    # d = ref - logp = [-1, 1, 0]: e^-1 + 1 - 1 = 0.3678794, e - 1 - 1 = 0.7182818, 0
    want_k3 = t([[math.exp(-1.0), math.e - 2.0, 0.0]])
    torch.testing.assert_close(kl_k3(logp, ref), want_k3, **EXACT, msg="k3")


def test_kl_estimator_table_names_k3_and_its_alias():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "low_var_kl"}, "estimator names changed"
    assert KL_ESTIMATORS["low_var_kl"] is KL_ESTIMATORS["k3"] is kl_k3, "alias must be k3"


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    gen = torch.Generator().manual_seed(2)
    logp = torch.randn(64, 32, generator=gen, dtype=F64) * 3
    ref = torch.randn(64, 32, generator=gen, dtype=F64) * 3
    assert (kl_k3(logp, ref) >= 0).all(), "k3 = e^d - d - 1 is never negative"
    assert (kl_k3(logp, logp) == 0).all(), "k3 must be exactly 0 when logp == ref_logp"


def test_kl_clamps_keep_extreme_differences_finite():
    # d = ±1e4 -> clamped to ±20: e^20 - 21 and e^-20 + 19 both exceed 10 -> value 10
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[1e4, -1e4]])
    for name, estimator in KL_ESTIMATORS.items():
        value = estimator(logp, ref)
        assert torch.isfinite(value).all(), f"{name} is not finite at ±1e4"
        value.sum().backward()
        assert torch.isfinite(logp.grad).all(), f"{name} gradient is not finite at ±1e4"
        logp.grad = None
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor([[10.0, 10.0]]), atol=0, rtol=0)


def test_kl_coef_zero_needs_no_reference():
    logp = torch.full((2, 2), -1.0, dtype=F64, requires_grad=True)
    loss, stats = grpo_loss(
        logp, logp.detach(), None, t([1.0, -1.0]), torch.ones(2, 2), kl_coef=0.0
    )
    assert torch.isfinite(loss), "loss without a reference must be finite"
    assert "kl" not in stats.as_dict(), "no reference: there is no KL to report"


def test_kl_coef_positive_without_reference_raises():
    logp = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="ref_logp is None"):
        grpo_loss(logp, logp, None, torch.zeros(2), torch.ones(2, 2), kl_coef=0.01)


# -- the full loss ------------------------------------------------------------------------


def test_hand_example_full_loss_and_stats():
    # Two groups of G=2, T=2, advantages [1, -1 | 0.5, -0.5], old_logp -1 everywhere.
    # ratios (row: tokens)          per-token surrogate L = max(-A rho, -A clip(rho, 0.8, 1.2))
    # r0 A=1:    1.5, 1.0          max(-1.5, -1.2) = -1.2 (clipped);  -1.0
    # r1 A=-1:   0.5, (masked)     max(0.5, 0.8) = 0.8 (clipped)
    # r2 A=0.5:  0.9, 0.7          -0.45;  max(-0.35, -0.4) = -0.35 (A>0: low side not clipped)
    # r3 A=-0.5: 5.0, 1.1          max(2.5, 0.6) = 2.5 -> dual clip min(2.5, 0.5*3) = 1.5;  0.55
    # sum L = -1.2 - 1 + 0.8 - 0.45 - 0.35 + 1.5 + 0.55 = -0.15 over 7 tokens
    # k3 with d = ref - logp: ln 2 at (0,0) -> 1 - ln 2; -ln 2 at (2,1) -> ln 2 - 0.5; else 0;
    # sum kl = 0.5. loss = (-0.15 + 0.1 * 0.5) / 7 = -0.1 / 7
    ratios = t([[1.5, 1.0], [0.5, 1.0], [0.9, 0.7], [5.0, 1.1]])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    old = torch.full((4, 2), -1.0, dtype=F64)
    logp = old + ratios.log()
    d = torch.zeros(4, 2, dtype=F64)
    d[0, 0], d[2, 1] = math.log(2.0), -math.log(2.0)
    ref = logp + d
    logp[1, 1], ref[1, 1] = 50.0, math.nan  # masked: must not matter
    loss, raw_stats = grpo_loss(logp, old, ref, t([1.0, -1.0, 0.5, -0.5]), mask, kl_coef=0.1)
    stats = raw_stats.as_dict()
    expected = {
        "loss": (loss, -0.1 / 7),
        "policy_loss": (stats["policy_loss"], -0.15 / 7),
        "kl": (stats["kl"], 0.5 / 7),
        "clip_frac": (stats["clip_frac"], 2 / 7),  # (0,0) and (1,0)
        "dual_clip_frac": (stats["dual_clip_frac"], 1 / 7),  # (3,0)
        "ratio_mean": (stats["ratio_mean"], 10.7 / 7),  # 1.5+1+0.5+0.9+0.7+5+1.1 = 10.7
        "ratio_min": (stats["ratio_min"], 0.5),
        "ratio_max": (stats["ratio_max"], 5.0),
        "num_tokens": (stats["num_tokens"], 7.0),
    }
    for name, (got, want) in expected.items():
        torch.testing.assert_close(got, t(want), **EXACT, msg=f"{name} off the hand value")
        assert got.dim() == 0, f"{name} must be a 0-dim tensor"
    assert not any(v.requires_grad for v in stats.values()), "stats must be detached"


def test_all_three_aggregations_on_a_hand_example():
    values = t([[1.0, 2.0, 3.0], [4.0, 99.0, -99.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    # seq-mean-token-mean: mean(6 / 3, 4 / 1) = (2 + 4) / 2 = 3
    # seq-mean-token-sum-norm, max_completion_length 5: 10 / (2 rows * 5) = 1
    want = {"token-mean": 2.5, "seq-mean-token-mean": 3.0, "seq-mean-token-sum-norm": 1.0}
    assert set(AGGREGATIONS) == set(want), "aggregation names changed"
    for name, value in want.items():
        got = AGGREGATIONS[name](values, mask, max_completion_length=5)
        torch.testing.assert_close(got, t(value), **EXACT, msg=f"{name} aggregation")
    torch.testing.assert_close(masked_mean(values, mask), t(2.5), **EXACT, msg="masked_mean")
    torch.testing.assert_close(
        masked_mean(values, mask, dim=1), t([2.0, 4.0]), **EXACT, msg="masked_mean per row"
    )


def test_seq_mean_token_mean_skips_sequences_without_tokens():
    # rows [2, 4] (2 tokens) and [6] (1 token) and an all-masked row: (3 + 6) / 2 = 4.5;
    # counting the empty row would give 9 / 3 = 3 and make padding rows dilute the loss
    values = t([[2.0, 4.0], [6.0, 0.0], [7.0, 7.0]])
    mask = t([[1, 1], [1, 0], [0, 0]])
    got = AGGREGATIONS["seq-mean-token-mean"](values, mask)
    torch.testing.assert_close(got, t(4.5), **EXACT, msg="empty sequence counted in the mean")
    assert aggregation_normalizer("seq-mean-token-mean", mask) == 2.0, "normaliser counts rows"


def _accumulated_grad(aggregation: str, splits: list[slice], normalize: bool) -> torch.Tensor:
    """Gradient w.r.t. logits of a mini-batch whose loss is summed over micro-batches.

    normalize=True: each micro-batch divides by the mini-batch's normaliser (ours).
    normalize=False: each micro-batch averages over itself and the losses are averaged over
    micro-batches (verl 0.6's per-micro-batch mean).
    """
    gen = torch.Generator().manual_seed(3)
    rows, width, vocab = 6, 7, 11
    logits = torch.randn(rows, width, vocab, generator=gen, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, vocab, (rows, width), generator=gen)
    lengths = torch.tensor([7, 1, 4, 2, 6, 3])  # uneven: the case that exposes the bug
    mask = (torch.arange(width) < lengths.unsqueeze(1)).to(F64)  # (6, 7)
    old = torch.randn(rows, width, generator=gen, dtype=F64) * 0.1 - 2.5
    ref = torch.randn(rows, width, generator=gen, dtype=F64) * 0.1 - 2.5
    advantages = torch.randn(rows, generator=gen, dtype=F64)
    normalizer = aggregation_normalizer(aggregation, mask, max_completion_length=8)
    for part in splits:
        width_here = int(mask[part].sum(1).max())  # micro-batches are trimmed to their width
        cols = slice(0, width_here)
        logp = logits[part, cols].log_softmax(-1).gather(-1, tokens[part, cols, None])[..., 0]
        loss, _ = grpo_loss(
            logp,
            old[part, cols],
            ref[part, cols],
            advantages[part],
            mask[part, cols],
            kl_coef=0.1,
            aggregation=aggregation,
            max_completion_length=8,
            loss_normalizer=normalizer if normalize else None,
        )
        (loss if normalize else loss / len(splits)).backward()
    return logits.grad


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_gradient_accumulation_matches_one_pass(aggregation):
    one_pass = _accumulated_grad(aggregation, [slice(0, 6)], normalize=True)
    for splits in ([slice(0, 2), slice(2, 6)], [slice(i, i + 1) for i in range(6)]):
        accumulated = _accumulated_grad(aggregation, splits, normalize=True)
        torch.testing.assert_close(
            accumulated,
            one_pass,
            atol=1e-6,
            rtol=0,
            msg=f"{aggregation}: micro-batching {splits} changed the gradient",
        )


def test_naive_per_micro_batch_mean_breaks_accumulation_invariance():
    # the verl 0.6 bug: token-mean per micro-batch, averaged, weighs a short micro-batch's
    # tokens more than a long one's. The invariance test above must be able to tell.
    one_pass = _accumulated_grad("token-mean", [slice(0, 6)], normalize=True)
    naive = _accumulated_grad("token-mean", [slice(0, 2), slice(2, 6)], normalize=False)
    gap = (naive - one_pass).abs().max().item()
    assert gap > 1e-3, f"naive micro-batch mean should differ from one pass (gap {gap})"


# -- contracts ----------------------------------------------------------------------------


def test_loss_does_not_mutate_its_arguments():
    gen = torch.Generator().manual_seed(4)
    args = [torch.randn(3, 4, generator=gen) for _ in range(3)]
    advantages, mask = torch.randn(3, generator=gen), torch.tensor([[1, 1, 0, 0]] * 3)
    before = [a.clone() for a in [*args, advantages, mask]]
    grpo_loss(*args, advantages, mask)
    for original, now in zip(before, [*args, advantages, mask], strict=True):
        assert torch.equal(original, now), "grpo_loss modified an input in place"


def test_shape_mismatch_names_the_argument():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 4\)"):
        grpo_loss(logp, torch.zeros(2, 4), None, torch.zeros(2), torch.ones(2, 3), kl_coef=0.0)
    with pytest.raises(ValueError, match=r"advantages must be \(N,\) = \(2,\)"):
        grpo_loss(logp, logp, None, torch.zeros(2, 1), torch.ones(2, 3), kl_coef=0.0)


def test_unknown_variant_names_list_the_choices():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"kl_estimator is 'k4'; expected one of"):
        grpo_loss(logp, logp, logp, torch.zeros(2), torch.ones(2, 3), kl_estimator="k4")
    with pytest.raises(ValueError, match=r"aggregation is 'mean'; expected one of"):
        LossSettings(aggregation="mean")


def test_all_masked_batch_gives_zero_loss_and_no_nan():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, raw_stats = grpo_loss(
        logp, logp.detach(), logp.detach(), torch.ones(2), torch.zeros(2, 3)
    )
    stats = raw_stats.as_dict()
    loss.backward()
    assert loss.item() == 0.0, "no tokens: nothing to learn from"
    assert (logp.grad == 0).all(), "no tokens: gradient must be 0, not NaN"
    assert all(torch.isfinite(v) for v in stats.values()), f"NaN in stats: {stats}"


def test_loss_settings_defaults_reproduce_the_spec():
    assert LossSettings().kwargs() == {
        "clip_eps_low": 0.2,
        "clip_eps_high": 0.2,
        "dual_clip": 3.0,
        "kl_estimator": "k3",
        "aggregation": "token-mean",
        # the variants of section 4.15, all off: the paper's loss
        "policy_loss": "vanilla",
        "entropy_coef": 0.0,
        "entropy_quantile": None,
        "rollout_is": None,
        "rollout_is_cap": 2.0,
    }, "LossSettings defaults drifted from docs/method.md section 4"
    settings = LossSettings()
    assert settings.advantage_estimator == "grpo" and not settings.mask_truncated
    assert settings.overlong_buffer == 0 and not settings.keeps_sampler_logprobs


def test_old_logp_carries_no_gradient_even_if_not_detached():
    # a caller passing old_logp = logp (forgetting .detach()) would get rho = 1 with zero
    # gradient if the ratio differentiated through old_logp; the loss must detach it itself
    advantages, mask = t([1.5, -0.5]), torch.ones(2, 3, dtype=F64)
    logp = torch.full((2, 3), -0.7, dtype=F64, requires_grad=True)
    grpo_loss(logp, logp, None, advantages, mask, kl_coef=0.0)[0].backward()
    expected = -advantages.unsqueeze(1) * mask / 6  # -A * m / sum(m), sum(m) = 6
    torch.testing.assert_close(logp.grad, expected, **EXACT, msg="old_logp was not detached")
