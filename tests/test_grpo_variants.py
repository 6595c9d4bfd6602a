"""The field's GRPO variants (docs/method.md section 4.15), each restated by hand on small tensors.

GSPO and CISPO policy losses, RLOO and REINFORCE++-baseline advantages, the entropy (bonus and
top-entropy mask), the overlong penalty and truncated mask, and the truncated importance
weights of the sampler/trainer mismatch. Float64 throughout, so `atol=1e-6, rtol=0` is real.
"""

from __future__ import annotations

import math

import pytest
import torch

from safegrpo_pl.rl import grpo
from safegrpo_pl.rl.grpo import (
    POLICY_LOSSES,
    LossSettings,
    estimate_advantages,
    grpo_loss,
    high_entropy_tokens,
    loss_mask,
    overlong_penalty,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
    rollout_correction_weights,
)
from safegrpo_pl.rollout.logprobs import _Entropy, logprobs_and_entropy, per_token_logprobs

F64 = torch.float64
EXACT = {"atol": 1e-6, "rtol": 0.0}


def t(values, dtype=F64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _loss_and_grad(logp_values, old, advantages, mask, **kwargs):
    logp = logp_values.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, old, None, advantages, mask, kl_coef=0.0, **kwargs)
    loss.backward()
    return loss.detach(), logp.grad, stats


# -- GSPO ---------------------------------------------------------------------------------


def test_gspo_uses_one_clipped_ratio_per_sequence_with_token_gradients():
    # row 0: log-ratios [0.3, -0.1] -> mean 0.1, s0 = e^0.1 = 1.1051709 (inside [0.8, 1.2])
    # row 1: log-ratio [0.2] (its second token masked) -> s1 = e^0.2 = 1.2214028 > 1.2: with
    #   A = 2 > 0 the clipped branch -2 * 1.2 = -2.4 is taken (no gradient)
    # seq-mean-token-mean: ((-1 * s0 - 1 * s0) / 2 + (-2.4) / 1) / 2 = (-1.1051709 - 2.4) / 2
    old = t([[-1.0, -1.0], [-1.0, -1.0]])
    logp = old + t([[0.3, -0.1], [0.2, 7.0]])  # 7.0 sits in padding: must not matter
    mask = t([[1, 1], [1, 0]])
    options = dict(policy_loss="gspo", aggregation="seq-mean-token-mean", dual_clip=None)
    loss, grad, stats = _loss_and_grad(logp, old, t([1.0, 2.0]), mask, **options)
    s0 = math.exp(0.1)
    torch.testing.assert_close(loss, t((-s0 - 2.4) / 2), **EXACT, msg="GSPO loss off the formula")
    # d/dlogp_t of (1/2 rows) * (1/2 tokens) * (-A * s0 * pi_t / sg[pi_t]) = -A * s0 / 4
    expected = t([[-s0 / 4, -s0 / 4], [0.0, 0.0]])
    torch.testing.assert_close(grad, expected, **EXACT, msg="GSPO-token gradient off -A s_i")
    figures = stats.as_dict()
    assert figures["clip_frac"].item() == pytest.approx(1 / 3), "row 1's one token is clipped"
    torch.testing.assert_close(figures["ratio_max"], t(math.exp(0.2)), **EXACT)


def test_gspo_ratio_is_the_geometric_mean_so_opposite_token_ratios_cancel():
    # token log-ratios +0.5 and -0.5: vanilla clips the first (A > 0, e^0.5 > 1.2); GSPO's
    # sequence ratio is e^0 = 1 and clips nothing, each token gradient -A * 1 / 2
    old = t([[-2.0, -2.0]])
    logp = old + t([[0.5, -0.5]])
    options = dict(aggregation="seq-mean-token-mean", dual_clip=None)
    _, gspo_grad, gspo = _loss_and_grad(
        logp, old, t([1.0]), t([[1, 1]]), policy_loss="gspo", **options
    )
    _, _, vanilla = _loss_and_grad(logp, old, t([1.0]), t([[1, 1]]), **options)
    torch.testing.assert_close(gspo_grad, t([[-0.5, -0.5]]), **EXACT)
    assert gspo.as_dict()["clip_frac"] == 0 and vanilla.as_dict()["clip_frac"] == 0.5


def test_gspo_settings_use_their_own_clip_range_and_need_sequence_weighting():
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        LossSettings(policy_loss="gspo")
    kwargs = LossSettings(policy_loss="gspo", aggregation="seq-mean-token-mean").kwargs()
    assert (kwargs["clip_eps_low"], kwargs["clip_eps_high"]) == (3e-4, 4e-4), "GSPO paper range"
    assert kwargs["dual_clip"] is None and kwargs["policy_loss"] == "gspo"


# -- CISPO --------------------------------------------------------------------------------


def test_cispo_clips_the_weight_but_keeps_every_token_gradient():
    # eps_low 0.2, eps_high 0.28: ratios e^0.5 = 1.6487 -> weight 1.28 (clipped high),
    # e^0.05 = 1.0513 -> 1.0513 (inside), e^-0.7 = 0.4966 -> 0.8 (clipped low)
    # loss per token -w * A * logp; gradient -w * A / 3 (token-mean over 3), never 0
    old = t([[-1.0], [-1.0], [-1.0]])
    logp = old + t([[0.5], [0.05], [-0.7]])
    adv = t([1.0, -2.0, 0.5])
    mask = torch.ones(3, 1, dtype=F64)
    loss, grad, stats = _loss_and_grad(
        logp, old, adv, mask, policy_loss="cispo", clip_eps_high=0.28
    )
    w = t([1.28, math.exp(0.05), 0.8])
    torch.testing.assert_close(loss, (-w * adv * logp.squeeze(1)).sum() / 3, **EXACT)
    torch.testing.assert_close(grad.squeeze(1), -w * adv / 3, **EXACT, msg="CISPO grad")
    assert stats.as_dict()["clip_frac"].item() == pytest.approx(2 / 3), "two weights clipped"
    # vanilla PPO drops the gradient of the clipped first token (A > 0, ratio > 1 + eps)
    _, vanilla_grad, _ = _loss_and_grad(logp, old, adv, mask, clip_eps_high=0.28)
    assert vanilla_grad[0, 0] == 0 and grad[0, 0] != 0


def test_the_default_policy_loss_is_the_registered_vanilla_one():
    assert set(POLICY_LOSSES) >= {"vanilla", "gspo", "cispo"}
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 5, generator=gen, dtype=F64) - 0.5
    logp = old + 0.3 * torch.randn(4, 5, generator=gen, dtype=F64)
    adv, mask = t([1.0, -1.0, 0.4, -2.0]), (torch.rand(4, 5, generator=gen) > 0.3).to(F64)
    a = _loss_and_grad(logp, old, adv, mask)
    b = _loss_and_grad(logp, old, adv, mask, policy_loss="vanilla")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- advantages ---------------------------------------------------------------------------


def test_rloo_subtracts_the_mean_of_the_other_completions():
    # [1, 0, 0.5]: 1 - (0 + 0.5)/2 = 0.75, 0 - (1 + 0.5)/2 = -0.75, 0.5 - (1 + 0)/2 = 0
    # [0.25, 0.25, 0.25]: constant -> exactly 0
    got = rloo_advantages(t([1.0, 0.0, 0.5, 0.25, 0.25, 0.25]), 3)
    torch.testing.assert_close(got, t([0.75, -0.75, 0.0, 0.0, 0.0, 0.0]), **EXACT)
    assert (got[3:] == 0).all(), "a constant group must get exactly 0"
    # = G / (G - 1) times the GRPO centring
    rewards = t([0.1, 0.9, 0.4, 0.7])
    centred = rewards - rewards.mean()
    torch.testing.assert_close(rloo_advantages(rewards, 4), centred * 4 / 3, **EXACT)


def test_reinforce_plus_plus_baseline_whitens_over_tokens():
    # rewards [1, 0 | 0.5, 0.5], G 2 -> centred [0.5, -0.5, 0, 0]; lengths [1, 3, 2, 2], 8 tokens
    # token mean (0.5 * 1 - 0.5 * 3) / 8 = -0.125; deviations [0.625, -0.375, 0.125, 0.125]
    # unbiased token variance (0.390625 + 3 * 0.140625 + 2 * 2 * 0.015625) / 7 = 0.125
    # A = deviation / sqrt(0.125 + 1e-8); the constant group gets 0.125 / 0.3535534, not 0
    got = reinforce_plus_plus_baseline_advantages(t([1.0, 0.0, 0.5, 0.5]), t([1, 3, 2, 2]), 2)
    std = math.sqrt(0.125 + 1e-8)
    torch.testing.assert_close(got, t([0.625, -0.375, 0.125, 0.125]) / std, **EXACT)
    same = estimate_advantages(
        t([1.0, 0.0, 0.5, 0.5]), t([1, 3, 2, 2]), 2, estimator="reinforce_plus_plus_baseline"
    )
    assert torch.equal(got, same)


def test_estimators_other_than_grpo_refuse_a_std_scale_they_would_ignore():
    with pytest.raises(ValueError, match="does not read it"):
        LossSettings(advantage_estimator="rloo", advantage_scale="batch")
    with pytest.raises(ValueError, match="expected one of"):
        LossSettings(advantage_estimator="remax")


# -- overlong -----------------------------------------------------------------------------


def test_overlong_penalty_falls_linearly_over_the_buffer():
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 (factor 1)
    got = overlong_penalty(torch.tensor([3, 6, 7, 9, 10]), 10, 4)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]), **EXACT)
    half = overlong_penalty(torch.tensor([8]), 10, 4, factor=0.5)  # -(8 - 6) / 4 * 0.5
    torch.testing.assert_close(half, torch.tensor([-0.25]), **EXACT)
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(torch.tensor([3]), 10, 11)


def test_mask_truncated_takes_cut_completions_out_of_the_loss():
    mask = torch.ones(4, 3)
    truncated = torch.tensor([False, True, False, False])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])  # group 1 constant
    got = loss_mask(mask, rewards, 2, drop_zero_variance=False, truncated=truncated)
    assert got.sum(1).tolist() == [3, 0, 3, 3]
    both = loss_mask(mask, rewards, 2, drop_zero_variance=True, truncated=truncated)
    assert both.sum(1).tolist() == [3, 0, 0, 0], "both rules apply together"
    assert loss_mask(mask, rewards, 2, False) is mask, "off: the completion mask as it is"


# -- entropy ------------------------------------------------------------------------------


def test_entropy_matches_its_definition_and_rides_with_the_log_probs():
    # logits [0, ln 2, ln 3] at T = 1: p = [1, 2, 3] / 6, H = -sum p ln p = 1.0114043
    # at T = 2: logits [0, ln 2 / 2, ln 3 / 2], p proportional to [1, sqrt 2, sqrt 3]
    logits = t([[0.0, math.log(2), math.log(3)]])
    for temperature in (1.0, 2.0):
        p = torch.softmax(logits / temperature, -1)
        want = -(p * p.log()).sum(-1)
        logp, entropy = logprobs_and_entropy(logits, torch.tensor([2]), temperature)
        torch.testing.assert_close(entropy, want.float(), **EXACT)
        assert torch.equal(logp, per_token_logprobs(logits, torch.tensor([2]), temperature))
    uniform = logprobs_and_entropy(torch.zeros(1, 7), torch.tensor([0]))[1]
    torch.testing.assert_close(uniform, torch.tensor([math.log(7)]), **EXACT)


def test_entropy_gradient_is_exact():
    z = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(_Entropy.apply, (z.requires_grad_(True),))


def test_entropy_bonus_subtracts_coef_times_the_token_mean_entropy():
    # token-mean over 3 tokens: loss = policy - 0.1 * (0.5 + 1.0 + 2.0) / 3; dloss/dH = -0.1 / 3
    logp = torch.full((2, 2), -1.0, dtype=F64)
    mask = t([[1, 1], [1, 0]])
    entropy = t([[0.5, 1.0], [2.0, 9.0]]).requires_grad_(True)
    adv = t([0.0, 0.0])  # no policy term
    loss, stats = grpo_loss(
        logp, logp, None, adv, mask, kl_coef=0.0, entropy=entropy, entropy_coef=0.1
    )
    loss.backward()
    torch.testing.assert_close(loss, t(-0.1 * 3.5 / 3), **EXACT)
    torch.testing.assert_close(entropy.grad, -0.1 / 3 * mask, **EXACT)
    torch.testing.assert_close(stats.as_dict()["entropy"], t(3.5 / 3), **EXACT)


def test_top_entropy_mask_keeps_the_high_entropy_tokens_and_the_denominator():
    # loss-token entropies [0.1, 0.5, 0.9, 0.3, 0.7] (the 6th is padding): their 0.5 quantile
    # is 0.5, so the tokens with H >= 0.5 keep their gradient -A / 5 (5 tokens, not 3)
    entropy = t([[0.1, 0.5, 0.9], [0.3, 0.7, 5.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    keep = high_entropy_tokens(entropy, mask, 0.5)
    assert keep.tolist() == [[False, True, True], [False, True, False]]
    logp = torch.full((2, 3), -1.0, dtype=F64)
    adv = t([1.0, -2.0])
    _, grad, _ = _loss_and_grad(logp, logp, adv, mask, entropy=entropy, entropy_quantile=0.5)
    expected = -adv[:, None] * keep.to(F64) / 5
    torch.testing.assert_close(grad, expected, **EXACT, msg="80/20 mask: kept tokens / all")


def test_an_entropy_term_without_the_entropy_is_refused():
    logp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="need the per-token entropy"):
        grpo_loss(logp, logp, None, torch.ones(1), torch.ones(1, 2), entropy_coef=0.1)


# -- sampler/trainer mismatch -------------------------------------------------------------


def test_truncated_importance_weights_per_token_and_per_sequence():
    # log(pi_old / pi_sampler) = [[0.1, 1.0, -0.5]], the 3rd token masked in row 1
    old = t([[0.1, 1.0, -0.5], [0.2, 0.3, 9.0]]) - 1.0
    sampler = torch.full((2, 3), -1.0, dtype=F64)
    mask = t([[1, 1, 1], [1, 1, 0]])
    token = rollout_correction_weights(old, sampler, mask, "token", cap=2.0)
    want = t([[math.exp(0.1), 2.0, math.exp(-0.5)], [math.exp(0.2), math.exp(0.3), 0.0]])
    torch.testing.assert_close(token, want, **EXACT, msg="token TIS: min(ratio, cap), 0 masked")
    sequence = rollout_correction_weights(old, sampler, mask, "sequence", cap=2.0)
    # row 0: exp(0.1 + 1.0 - 0.5) = e^0.6 = 1.822; row 1: exp(0.5) = 1.6487
    want = t([[math.exp(0.6)] * 3, [math.exp(0.5)] * 2 + [0.0]])
    torch.testing.assert_close(sequence, want, **EXACT, msg="sequence TIS: product of ratios")


def test_rollout_correction_reweights_the_policy_loss_and_logs_the_sampler_kl():
    # one sequence, ratio 1 to the old policy; log(pi_old / pi_sampler) = [0.4, -0.2]
    # policy loss per token -A * 1 * w: weights [e^0.4 = 1.4918, e^-0.2 = 0.8187], cap 2
    # k3 = exp(d) - d - 1: [0.0918247, 0.0187308], mean 0.0552778
    logp = t([[-1.0, -2.0]])
    sampler = logp - t([[0.4, -0.2]])
    loss, grad, stats = _loss_and_grad(
        logp, logp, t([1.0]), t([[1, 1]]), sampler_logp=sampler, rollout_is="token"
    )
    w = t([math.exp(0.4), math.exp(-0.2)])
    torch.testing.assert_close(loss, -w.sum() / 2, **EXACT)
    torch.testing.assert_close(grad, -w[None] / 2, **EXACT)
    d = t([0.4, -0.2])
    k3 = (d.exp() - d - 1).mean()
    torch.testing.assert_close(stats.as_dict()["sampler_kl"], k3, **EXACT)
    # without the correction the sampler KL is still logged, the loss is plain
    plain, _, stats = _loss_and_grad(logp, logp, t([1.0]), t([[1, 1]]), sampler_logp=sampler)
    torch.testing.assert_close(plain, t(-1.0), **EXACT)
    torch.testing.assert_close(stats.as_dict()["sampler_kl"], k3, **EXACT)


def test_the_decode_loop_keeps_its_log_probs_and_bf16_sampling_gets_corrected(tiny_qwen25vl_path):
    """float32: the sampler's log-probs equal the trainer's to ~1e-6. Sampling under bf16
    autocast (a bf16 inference engine's kernels) against a float32 trainer: a real mismatch,
    which the token-level correction turns into weights exp(trainer - sampler)."""
    from test_rollout import _setup

    from safegrpo_pl.rollout.logprobs import completion_logprobs
    from safegrpo_pl.rollout.sampling import SamplingSettings

    setup = _setup(tiny_qwen25vl_path)
    settings = SamplingSettings(max_new_tokens=8)

    def sample_and_score(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            rollout = setup.sample(
                settings, generator=torch.Generator().manual_seed(0), keep_logprobs=True
            )
        trainer = completion_logprobs(
            setup.model, setup.batch, rollout.completion_ids, rollout.completion_mask, group_size=2
        )
        return rollout, trainer

    rollout, trainer = sample_and_score(autocast=False)
    keep = rollout.completion_mask.bool()
    assert (rollout.sampler_logp[~keep] == 0).all(), "no log-prob after a row's EOS"
    assert (trainer - rollout.sampler_logp)[keep].abs().max() < 1e-5, "float32: same numbers"

    rollout, trainer = sample_and_score(autocast=True)
    keep = rollout.completion_mask.bool()
    gap = (trainer - rollout.sampler_logp)[keep]
    assert gap.abs().max() > 1e-4, f"bf16 sampling should differ from float32 scoring: {gap}"
    adv = torch.linspace(-1.0, 1.0, len(rollout)).to(trainer)
    options = dict(kl_coef=0.0, sampler_logp=rollout.sampler_logp)
    corrected, stats = grpo_loss(trainer, trainer, None, adv, keep, rollout_is="token", **options)
    plain, _ = grpo_loss(trainer, trainer, None, adv, keep, **options)
    # ratio 1 to the old policy: token loss -A * w, w = min(exp(trainer - sampler), 2)
    weights = torch.exp(trainer - rollout.sampler_logp).clamp(max=2.0) * keep
    expected = (-adv[:, None] * weights).sum() / keep.sum()
    torch.testing.assert_close(corrected, expected, atol=1e-6, rtol=0)
    assert corrected != plain, "the correction must change the loss under a real mismatch"
    assert stats.as_dict()["sampler_kl"] > 0


def test_a_policy_loss_of_ones_own_is_one_function_and_one_registry_entry(monkeypatch):
    # docs/method.md 4.15's recipe: plain REINFORCE, loss -A * logp, gradient -A / tokens
    def reinforce_loss(logp, old_logp, advantages, weights, clip):
        loss = -advantages[:, None] * logp
        none = torch.zeros_like(weights, dtype=torch.bool)
        return grpo.PolicyTerms(loss, torch.ones_like(logp), none, none)

    monkeypatch.setitem(grpo.POLICY_LOSSES, "reinforce", reinforce_loss)
    settings = LossSettings(policy_loss="reinforce")
    logp = torch.full((2, 2), -1.0, dtype=F64)
    adv, mask = t([1.0, -0.5]), t([[1, 1], [1, 0]])
    loss, grad, _ = _loss_and_grad(logp, logp, adv, mask, **settings.kwargs())
    torch.testing.assert_close(loss, t((1.0 + 1.0 - 0.5) / 3), **EXACT)
    torch.testing.assert_close(grad, -adv[:, None] * mask / 3, **EXACT)
