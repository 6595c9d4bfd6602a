"""Non-finite steps are skipped, counted and named; a run of them stops with an error; and the
option to leave zero-variance groups out of the token-mean."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import lightning as L
import pytest
import torch
from test_module import LengthRewardModule, _data, _logged, _module, _trainer

from safegrpo_pl.rl.grpo import LossSettings, loss_mask
from safegrpo_pl.train.update import NonFiniteError, NonFiniteGuard


class NaNReferenceModule(LengthRewardModule):
    """The reference log-probs of the rollout batches in `bad_batches` are NaN (a rewards NaN
    is refused outright as a bug of the reward function, so the loss is poisoned here)."""

    bad_batches: tuple[int, ...] = ()
    batches_seen = 0

    def training_step(self, batch, batch_idx):
        self._poison = self.batches_seen in self.bad_batches
        self.batches_seen += 1
        return super().training_step(batch, batch_idx)

    def frozen_logprobs(self, batch, rollout, *, reference):
        logp = super().frozen_logprobs(batch, rollout, reference=reference)
        return torch.full_like(logp, math.nan) if reference and self._poison else logp


class NaNGradientModule(LengthRewardModule):
    """The first backward pass leaves a NaN in one gradient (loss and inputs stay finite)."""

    poisoned = False

    def manual_backward(self, loss, *args, **kwargs):
        super().manual_backward(loss, *args, **kwargs)
        if not self.poisoned:
            next(p for p in self.policy.parameters() if p.grad is not None).grad[0] = math.nan
            self.poisoned = True


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}


def test_nan_log_probs_skip_the_step_and_are_named(tiny_qwen25vl_path, tmp_path, caplog):
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path, cls=NaNReferenceModule, max_consecutive_skips=3)
    module.bad_batches = (0,)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, 1).fit(module, _data(tiny_qwen25vl_path))
    # the NaN batch took no step, so max_steps=1 needed the next (finite) batch as well
    assert _logged(tmp_path, "train/skipped_steps") == [1.0, 1.0]
    assert "optimiser step 1 skipped: non-finite loss, log_probs (loss=nan" in caplog.text
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())


def test_nan_advantages_are_named(tiny_qwen25vl_path, tmp_path, monkeypatch, caplog):
    import safegrpo_pl.rl.distributed as module_file  # where the module's advantages come from

    original = module_file.group_advantages
    calls = []

    def poisoned(rewards, group_size, **kwargs):
        calls.append(1)
        advantages = original(rewards, group_size, **kwargs)
        return advantages * math.nan if len(calls) == 1 else advantages

    monkeypatch.setattr(module_file, "group_advantages", poisoned)
    L.seed_everything(0)
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, 1).fit(_module(tiny_qwen25vl_path), _data(tiny_qwen25vl_path))
    assert "non-finite loss, grad_norm, advantages (" in caplog.text
    assert _logged(tmp_path, "train/skipped_steps") == [1.0, 1.0]


def test_a_nan_gradient_is_skipped_and_the_weights_stay_unchanged(tiny_qwen25vl_path, tmp_path):
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path, cls=NaNGradientModule)
    module.configure_model()
    before = _weights(module)
    seen: list[dict[str, torch.Tensor]] = []

    class AfterFirstBatch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(_weights(pl_module))

    _trainer(tmp_path, 1, callbacks=[AfterFirstBatch()]).fit(module, _data(tiny_qwen25vl_path))
    assert all(torch.equal(seen[0][n], w) for n, w in before.items()), "a NaN step was taken"
    assert any(not torch.equal(seen[1][n], w) for n, w in before.items()), "no later step"
    assert _logged(tmp_path, "train/skipped_steps") == [1.0, 1.0]


def test_consecutive_non_finite_steps_stop_the_run_naming_step_and_values(
    tiny_qwen25vl_path, tmp_path
):
    L.seed_everything(0)
    module = _module(tiny_qwen25vl_path, cls=NaNReferenceModule, max_consecutive_skips=2)
    module.bad_batches = (0, 1)
    with pytest.raises(NonFiniteError, match=r"optimiser step 1: 2 steps in a row.*loss=nan"):
        _trainer(tmp_path, 4).fit(module, _data(tiny_qwen25vl_path))


def test_the_guard_counts_and_resets(caplog):
    guard = NonFiniteGuard(max_consecutive=2)
    values = {"loss": torch.tensor(math.inf), "grad_norm": torch.tensor(1.0)}
    with caplog.at_level(logging.WARNING):
        assert guard.record(5, ["loss"], values) is True
    assert "optimiser step 5 skipped: non-finite loss (loss=inf, grad_norm=1)" in caplog.text
    assert guard.record(6, [], values) is False and guard.consecutive == 0
    assert guard.record(7, ["loss"], values) is True and guard.skipped == 2
    with pytest.raises(NonFiniteError, match="optimiser step 8: 2 steps in a row"):
        guard.record(8, ["loss"], values)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        NonFiniteGuard(0)


def test_loss_mask_drops_only_groups_with_equal_rewards():
    mask = torch.ones(6, 3)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])  # groups of 2: equal, varied, equal
    kept = loss_mask(mask, rewards, 2, drop_zero_variance=True)
    assert kept.sum(1).tolist() == [0, 0, 3, 3, 0, 0]
    assert loss_mask(mask, rewards, 2, drop_zero_variance=False) is mask


class OneFlatGroupModule(LengthRewardModule):
    """Group 0's rewards all 0 (no signal), the others' 0, 1/G, 2/G...; keeps its rollouts."""

    rollouts: list

    def score(self, batch, rollout):
        self.rollouts = [*getattr(self, "rollouts", []), rollout]
        parts = super().score(batch, rollout)
        group = rollout.group_size
        return [
            replace(p, total=0.0 if i < group else (i % group) / group) for i, p in enumerate(parts)
        ]


def _first_step_gradients(path, root, drop: bool):
    from test_module import GradientRecorder

    L.seed_everything(0)
    loss = LossSettings(drop_zero_variance=drop)
    # no clipping: the recorder sees the gradients after it, and it would hide the scale
    module = _module(path, cls=OneFlatGroupModule, kl_coef=0.0, loss=loss, max_grad_norm=1e9)
    recorder = GradientRecorder()
    _trainer(root, 1, callbacks=[recorder]).fit(module, _data(path))
    return recorder.grads, module.rollouts[0]


def test_dropping_zero_variance_groups_rescales_the_token_mean(tiny_qwen25vl_path, tmp_path):
    kept, rollout = _first_step_gradients(tiny_qwen25vl_path, tmp_path / "keep", drop=False)
    dropped, _ = _first_step_gradients(tiny_qwen25vl_path, tmp_path / "drop", drop=True)
    # With kl_coef 0 the flat group adds nothing to the numerator; leaving its tokens out of the
    # denominator scales the gradient by all tokens / the other groups' tokens.
    tokens = rollout.completion_mask.sum(1)
    scale = float(tokens.sum() / tokens[rollout.group_size :].sum())
    assert scale > 1.0
    assert any(g.abs().max() > 1e-4 for g in kept.values()), "no gradient to compare"
    for name, grad in kept.items():
        torch.testing.assert_close(dropped[name], grad * scale, atol=1e-6, rtol=1e-4, msg=name)
