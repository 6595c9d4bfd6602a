"""One optimiser step of GRPO over a mini-batch of whole groups, micro-batched.

`PolicyUpdate` holds what a step reads, declared: its settings (`UpdateSettings`), the policy
runner, the guard against non-finite steps and the phase timer; the Lightning handles come in
as an argument (`OptimiserHost`). Each micro-batch's loss is divided by the mini-batch's
normaliser summed over all ranks, and its gradient is scaled back up by the number of
data-parallel ranks (the strategies average gradients), so any micro-batch size and any number
of processes give the one-process, one-pass gradient (docs/method.md section 4). A step whose
loss, gradients, advantages or log-probs are not finite is skipped on every rank together
(`NonFiniteGuard`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.rl.distributed import (
    data_parallel_size,
    global_normalizer,
    gradient_scale,
    sum_over_ranks,
    sync_loss_stats,
)
from safegrpo_pl.rl.grpo import (
    LossSettings,
    LossStats,
    aggregation_normalizer,
    completion_rows,
    grpo_loss,
)
from safegrpo_pl.rollout.sampling import Rollout
from safegrpo_pl.train.fsdp import clip_sharded_gradients, is_sharded
from safegrpo_pl.train.policy_runner import PolicyRunner


class StepTimer:
    """Seconds per named phase, summed until `pop` (CUDA-synchronised at both ends, so a phase
    is charged for the kernels it launched, not for the ones before it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The phases timed since the last call, and a fresh start."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


log = logging.getLogger(__name__)

# What a step's values are called in the logs and errors, in the order they are reported.
CHECKED = ("loss", "grad_norm", "advantages", "log_probs")


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


def nonfinite_names(values: Mapping[str, Tensor | None]) -> list[str]:
    """The names of the tensors in `values` holding a NaN or an infinity (None: not checked)."""
    return [
        name
        for name, value in values.items()
        if value is not None and not bool(torch.isfinite(value.detach()).all())
    ]


def _describe(values: Mapping[str, Tensor | None]) -> str:
    """'loss=nan, grad_norm=inf, advantages: 2 of 8 not finite'."""
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        value = value.detach().float()
        if value.numel() == 1:
            parts.append(f"{name}={value.item():.4g}")
        else:
            bad = int((~torch.isfinite(value)).sum())
            parts.append(f"{name}: {bad} of {value.numel()} not finite")
    return ", ".join(parts)


class NonFiniteGuard:
    """Counts skipped steps; raises after `max_consecutive` skips in a row.

    Args:
        max_consecutive: skipped steps in a row that stop the run (at least 1).
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(
                f"max_consecutive_skips is {max_consecutive}; expected at least 1 "
                "(1 stops at the first non-finite step)"
            )
        self.max_consecutive = max_consecutive
        self.skipped = 0  # over the whole run (checkpointed)
        self.consecutive = 0

    def check(
        self,
        step: int,
        values: Mapping[str, Tensor | None],
        logp_ok: bool = True,
        agree: Callable[..., bool] | None = None,
    ) -> bool:
        """Check optimiser step `step`'s values; True when it must be skipped.

        `logp_ok` says whether the log-probs it used were finite; `agree(flag, all=False)`
        (Lightning's `strategy.reduce_boolean_decision`) makes every process skip when one must.
        """
        bad = nonfinite_names(values) + ([] if logp_ok else ["log_probs"])
        skip = bool(agree(bool(bad), all=False)) if agree is not None else bool(bad)
        if skip and not bad:
            bad = ["values on another process"]
        return self.record(step, bad if skip else [], values)

    def record(self, step: int, bad: list[str], values: Mapping[str, Tensor | None]) -> bool:
        """Note the outcome of optimiser step `step`; True when it must be skipped.

        `bad` names the non-finite values (on any process); `values` are this process's.
        """
        if not bad:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        described = _describe(values)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"optimiser step {step}: {self.consecutive} steps in a row had non-finite "
                f"{', '.join(bad)} ({described}); stopping. Lower model.lr, check the data, or "
                "raise model.max_consecutive_skips"
            )
        log.warning(
            "optimiser step %d skipped: non-finite %s (%s); %d skipped so far",
            step,
            ", ".join(bad),
            described,
            self.skipped,
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


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


class OptimiserHost(Protocol):
    """What a step uses of the LightningModule under manual optimisation."""

    _trainer: Any  # None outside a Trainer

    @property
    def global_step(self) -> int: ...

    def optimizers(self) -> Any: ...

    def lr_schedulers(self) -> Any: ...

    def manual_backward(self, loss: Tensor) -> None: ...

    def clip_gradients(
        self, optimizer: Any, gradient_clip_val: float, gradient_clip_algorithm: str
    ) -> None: ...


@dataclass(frozen=True)
class UpdateSettings:
    """The run's settings that one optimiser step reads.

    Attributes:
        loss: clipping, KL estimator, aggregation (`LossSettings`).
        kl_coef: weight of the KL term (beta).
        max_grad_norm: gradient-norm clipping threshold.
        micro_batch_size: prompts per forward/backward; None = the mini-batch.
        temperature: the sampling temperature the log-probs are computed at.
        max_new_tokens: the completion budget (some aggregations divide by it).
        recompute_head: the training forward keeps no full-vocabulary logits: each LM-head
            chunk's are recomputed in backward (`safegrpo_pl.rollout.logprobs`).
    """

    loss: LossSettings
    kl_coef: float
    max_grad_norm: float
    micro_batch_size: int | None
    temperature: float
    max_new_tokens: int
    recompute_head: bool


@dataclass(frozen=True)
class StepFigures:
    """What one optimiser step logs: the global mini-batch's loss, its statistics, and the
    gradient norm before clipping."""

    loss: Tensor
    stats: LossStats
    grad_norm: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        """The logged figures, by name (`train/<name>`)."""
        figures = {"loss": self.loss, **self.stats.as_dict(), "grad_norm": self.grad_norm}
        figures.pop("num_tokens")
        return figures


class PolicyUpdate:
    """One optimiser step over a `ScoredRollout` (see the module docstring).

    Args:
        settings: the step's settings.
        runner: the loaded policy; its `model` is what is trained.
        guard: counts and skips non-finite steps.
        timer: charges each phase's seconds (`time/*`).
    """

    def __init__(
        self,
        settings: UpdateSettings,
        runner: PolicyRunner,
        guard: NonFiniteGuard,
        timer: StepTimer,
    ) -> None:
        self.settings = settings
        self.runner = runner
        self.guard = guard
        self.timer = timer

    def step(
        self,
        host: OptimiserHost,
        scored: ScoredRollout,
        prompts: Sequence[int],
        fresh: bool = False,
    ) -> StepFigures:
        """One optimiser step on the mini-batch of `prompts` (whole groups), micro-batched.

        `fresh`: the weights are still the sampling policy's, so the forward's own log-probs
        are the old ones (written into `scored.old_logp` for later passes). The step is
        skipped, on every rank together, when the loss, the gradients, the advantages or the
        log-probs are not finite.
        """
        settings = self.settings
        optimizer = host.optimizers()
        mini_mask = scored.loss_mask[completion_rows(prompts, scored.rollout.group_size)]
        # The mini-batch's denominator, shared by its micro-batches and summed over all ranks:
        # any micro-batch size gives the same gradient (docs/method.md section 4).
        normalizer = global_normalizer(
            aggregation_normalizer(settings.loss.aggregation, mini_mask, settings.max_new_tokens)
        )
        optimizer.zero_grad()
        loss_total, merged, finite_logp = None, None, True
        micro_size = settings.micro_batch_size or len(prompts)
        for start in range(0, len(prompts), micro_size):
            micro = list(prompts[start : start + micro_size])
            loss, stats, logp_ok = self._micro_step(host, scored, micro, normalizer, fresh)
            # micro-batch losses and statistics add up to the mini-batch's
            loss_total = loss if loss_total is None else loss_total + loss
            merged = stats if merged is None else merged.merge(stats)
            finite_logp = finite_logp and logp_ok
        with self.timer.phase("optimizer"):
            grad_norm = self._clip_gradients(host, optimizer, clip=False)
            if self._skip_step(host, loss_total, grad_norm, scored.advantages, finite_logp):
                optimizer.zero_grad()
            else:
                self._clip_gradients(host, optimizer, clip=True)
                optimizer.step()
                optimizer.zero_grad()  # no gradient held through the next rollout
                schedule = host.lr_schedulers()
                if schedule is not None:
                    schedule.step()  # manual optimisation: Lightning leaves this to us
        loss_total = sum_over_ranks(loss_total).to(loss_total)  # the global mini-batch's loss
        return StepFigures(loss_total, sync_loss_stats(merged), grad_norm)

    def _clip_gradients(self, host: OptimiserHost, optimizer: Any, *, clip: bool) -> Tensor:
        """The global gradient norm before clipping; with `clip`, clip to `max_grad_norm`.

        Sharded (FSDP2) gradients are measured and clipped with torch's `clip_grad_norm_`,
        which reduces the norm over the shards (Lightning's precision plugins refuse to clip
        them); replicated ones through Lightning, which also unscales mixed-precision
        gradients first.
        """
        policy, limit = self.runner.model, self.settings.max_grad_norm
        if is_sharded(policy):
            return clip_sharded_gradients(policy.parameters(), limit if clip else float("inf"))
        grad_norm = gradient_norm(policy.parameters())
        if clip:
            host.clip_gradients(optimizer, gradient_clip_val=limit, gradient_clip_algorithm="norm")
        return grad_norm

    def _skip_step(
        self,
        host: OptimiserHost,
        loss: Tensor,
        grad_norm: Tensor,
        advantages: Tensor,
        logp_ok: bool,
    ) -> bool:
        """Whether something was not finite, on any process (all skip together, so the
        replicas stay equal); raises after too many such steps in a row."""
        values = {"loss": loss, "grad_norm": grad_norm, "advantages": advantages}
        trainer = host._trainer
        agree = trainer.strategy.reduce_boolean_decision if trainer is not None else None
        return self.guard.check(host.global_step + 1, values, logp_ok, agree)

    def _micro_step(
        self,
        host: OptimiserHost,
        scored: ScoredRollout,
        micro: list[int],
        normalizer: float,
        fresh: bool = False,
    ) -> tuple[Tensor, LossStats, bool]:
        """Forward and backward of one micro-batch; returns its detached loss and statistics,
        and whether its log-probs (old and reference too) were finite."""
        settings = self.settings
        rollout, old_logp, ref_logp = scored.rollout, scored.old_logp, scored.ref_logp
        rows = completion_rows(micro, rollout.group_size)
        tokens = rollout.completion_mask[rows]
        width = int(tokens.sum(1).max().item()) or 1
        tokens, ids = tokens[:, :width], rollout.completion_ids[rows, :width]
        loss_tokens = scored.loss_mask[rows, :width]  # a subset of `tokens`
        with self.timer.phase("policy_forward_backward"):
            # The entropy comes from the same LM-head chunks (logged as train/entropy); it
            # carries a gradient only for an entropy bonus.
            logp, entropy = self.runner.logprobs_and_entropy(
                self.runner.model,
                scored.batch.select(micro),
                ids,
                tokens,
                settings.temperature,
                entropy_grad=settings.loss.needs_entropy_grad,
                recompute_head=settings.recompute_head,
            )
            if old_logp is None or fresh:
                old = logp.detach()
                if old_logp is not None:
                    old_logp[rows, :width] = old
            else:
                old = old_logp[rows, :width]
            ref = None if ref_logp is None else ref_logp[rows, :width]
            sampler = rollout.sampler_logp
            loss, stats = grpo_loss(
                logp,
                old,
                ref,
                scored.advantages[rows],
                loss_tokens,
                **settings.loss.kwargs(),
                kl_coef=settings.kl_coef,
                loss_normalizer=normalizer,
                max_completion_length=settings.max_new_tokens,
                entropy=entropy,
                sampler_logp=None if sampler is None else sampler[rows, :width],
            )
            # DDP and FSDP average gradients over ranks; the loss is a share of a global sum.
            host.manual_backward(loss * gradient_scale(data_parallel_size(host._trainer)))
        counted = loss_tokens.bool()
        used = [logp.detach(), old] + ([] if ref is None else [ref])
        logp_ok = not nonfinite_names({str(i): t[counted] for i, t in enumerate(used)})
        return loss.detach(), stats, logp_ok


def gradient_norm(params: Iterable[torch.nn.Parameter]) -> Tensor:
    """The global L2 norm of the gradients (before clipping), 0 when none exists yet."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
