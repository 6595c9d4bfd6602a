"""`PolicyUpdate`: one optimiser step of GRPO over a mini-batch of whole groups, micro-batched.

A mixin of `SafeGRPOModule` (it uses the module's Lightning handles: `optimizers`,
`manual_backward`, `clip_gradients`, `lr_schedulers`, and its settings), kept apart so that the
module reads as the loop and this file as the update. Each micro-batch's loss is divided by the
mini-batch's normaliser summed over all ranks, and its gradient is scaled back up by the number
of data-parallel ranks (the strategies average gradients), so any micro-batch size and any
number of processes give the one-process, one-pass gradient (docs/method.md section 4). A step
whose loss, gradients, advantages or log-probs are not finite is skipped on every rank together
(`safegrpo_pl.nonfinite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from safegrpo_pl.aggregation import aggregation_normalizer
from safegrpo_pl.distributed import (
    data_parallel_size,
    global_normalizer,
    gradient_scale,
    sum_over_ranks,
    sync_loss_stats,
)
from safegrpo_pl.grpo import grpo_loss
from safegrpo_pl.grpo_step import completion_rows, gradient_norm
from safegrpo_pl.inputs import PromptBatch
from safegrpo_pl.loss_stats import LossStats
from safegrpo_pl.nonfinite import nonfinite_names
from safegrpo_pl.sampling import Rollout
from safegrpo_pl.sharding import clip_sharded_gradients, is_sharded


@dataclass
class ScoredRollout:
    """A rollout batch with what every optimiser step over it reads.

    Attributes:
        batch: the B prompts.
        rollout: their N = B * G completions.
        advantages: (N,) one per completion.
        old_logp: (N, T) the sampling policy's log-probs, or None when the first step's own
            forward provides them (one step per rollout); filled in by that step otherwise.
        ref_logp: (N, T) the reference's log-probs, or None without a KL term.
        mask: (N, T) the tokens the loss counts; None: the completions'.
    """

    batch: PromptBatch
    rollout: Rollout
    advantages: Tensor
    old_logp: Tensor | None = None
    ref_logp: Tensor | None = None
    mask: Tensor | None = None

    @property
    def loss_mask(self) -> Tensor:
        """(N, T) the tokens the loss counts: `mask`, or every completion token."""
        return self.rollout.completion_mask if self.mask is None else self.mask


class PolicyUpdate:
    """The optimiser step of `SafeGRPOModule` (see the module docstring)."""

    def optimise(
        self, scored: ScoredRollout, prompts: Sequence[int], fresh: bool = False
    ) -> dict[str, Tensor]:
        """One optimiser step on the mini-batch of `prompts` (whole groups), micro-batched.

        `fresh`: the weights are still the sampling policy's, so the forward's own log-probs
        are the old ones (written into `scored.old_logp` for later passes). The step is
        skipped, on every rank together, when the loss, the gradients, the advantages or the
        log-probs are not finite.
        """
        optimizer = self.optimizers()
        mini_mask = scored.loss_mask[completion_rows(prompts, scored.rollout.group_size)]
        # The mini-batch's denominator, shared by its micro-batches: any micro-batch size gives
        # the same gradient (docs/method.md section 4).
        # ... over all ranks: each rank's loss is then its share of the global sum.
        normalizer = global_normalizer(
            aggregation_normalizer(
                self.loss_settings.aggregation, mini_mask, self.sampling.max_new_tokens
            )
        )
        optimizer.zero_grad()
        loss_total, merged, finite_logp = None, None, True
        micro_size = self.micro_batch_size or len(prompts)
        for start in range(0, len(prompts), micro_size):
            micro = list(prompts[start : start + micro_size])
            loss, stats, logp_ok = self._micro_step(scored, micro, normalizer, fresh)
            # micro-batch losses and statistics add up to the mini-batch's
            loss_total = loss if loss_total is None else loss_total + loss
            merged = stats if merged is None else merged.merge(stats)
            finite_logp = finite_logp and logp_ok
        with self.timer.phase("optimizer"):
            grad_norm = self._clip_gradients(optimizer, clip=False)
            if self._skip_step(loss_total, grad_norm, scored.advantages, finite_logp):
                optimizer.zero_grad()
            else:
                self._clip_gradients(optimizer, clip=True)
                optimizer.step()
                schedule = self.lr_schedulers()
                if schedule is not None:
                    schedule.step()  # manual optimisation: Lightning leaves this to us
        loss_total = sum_over_ranks(loss_total).to(loss_total)  # the global mini-batch's loss
        return self._step_figures(loss_total, sync_loss_stats(merged), grad_norm)

    def _clip_gradients(self, optimizer: Any, *, clip: bool) -> Tensor:
        """The global gradient norm before clipping; with `clip`, clip to `max_grad_norm`.

        Sharded (FSDP2) gradients are measured and clipped with torch's `clip_grad_norm_`,
        which reduces the norm over the shards (Lightning's precision plugins refuse to clip
        them); replicated ones through Lightning, which also unscales mixed-precision
        gradients first.
        """
        if is_sharded(self.policy):
            limit = self.max_grad_norm if clip else float("inf")
            return clip_sharded_gradients(self.policy.parameters(), limit)
        grad_norm = gradient_norm(self.policy.parameters())
        if clip:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
        return grad_norm

    def _skip_step(
        self, loss: Tensor, grad_norm: Tensor, advantages: Tensor, logp_ok: bool
    ) -> bool:
        """Whether something was not finite, on any process (all skip together, so the
        replicas stay equal); raises after too many such steps in a row."""
        values = {"loss": loss, "grad_norm": grad_norm, "advantages": advantages}
        agree = self.trainer.strategy.reduce_boolean_decision if self._trainer else None
        return self.guard.check(self.global_step + 1, values, logp_ok, agree)

    def _micro_step(
        self, scored: ScoredRollout, micro: list[int], normalizer: float, fresh: bool = False
    ) -> tuple[Tensor, LossStats, bool]:
        """Forward and backward of one micro-batch; returns its detached loss and statistics,
        and whether its log-probs (old and reference too) were finite."""
        rollout, old_logp, ref_logp = scored.rollout, scored.old_logp, scored.ref_logp
        rows = completion_rows(micro, rollout.group_size)
        tokens = rollout.completion_mask[rows]
        width = int(tokens.sum(1).max().item()) or 1
        tokens, ids = tokens[:, :width], rollout.completion_ids[rows, :width]
        loss_tokens = scored.loss_mask[rows, :width]  # a subset of `tokens`
        with self.timer.phase("policy_forward_backward"):
            logp = self.runner.logprobs(
                self.policy, scored.batch.select(micro), ids, tokens, self.sampling.temperature
            )
            if old_logp is None or fresh:
                old = logp.detach()
                if old_logp is not None:
                    old_logp[rows, :width] = old
            else:
                old = old_logp[rows, :width]
            ref = None if ref_logp is None else ref_logp[rows, :width]
            loss, stats = grpo_loss(
                logp,
                old,
                ref,
                scored.advantages[rows],
                loss_tokens,
                **self.loss_settings.kwargs(),
                kl_coef=self.kl_coef,
                loss_normalizer=normalizer,
                max_completion_length=self.sampling.max_new_tokens,
            )
            # DDP and FSDP average gradients over ranks; the loss is a share of a global sum.
            self.manual_backward(loss * gradient_scale(data_parallel_size(self._trainer)))
        counted = loss_tokens.bool()
        used = [logp.detach(), old] + ([] if ref is None else [ref])
        logp_ok = not nonfinite_names({str(i): t[counted] for i, t in enumerate(used)})
        return loss.detach(), stats, logp_ok

    @staticmethod
    def _step_figures(loss: Tensor, stats: LossStats, grad_norm: Tensor) -> dict[str, Tensor]:
        figures = {"loss": loss, **stats.as_dict(), "grad_norm": grad_norm}
        figures.pop("num_tokens")
        return figures
