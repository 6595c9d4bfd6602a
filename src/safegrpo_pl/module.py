"""`SafeGRPOModule`: the GRPO loop of SafeGRPO, by hand, in a LightningModule.

One training batch is one rollout batch of B prompts. Per batch: sample G completions per
prompt, score them with the rule rewards, normalise rewards within each group, compute the old
and reference log-probs once, then take `num_iterations` passes of optimiser steps over
mini-batches of whole groups (SPEC section 4). Lightning's manual optimisation is used because
one rollout feeds several optimiser steps; `trainer.max_steps` therefore counts optimiser steps.

Departures and choices (all deliberate; see also `grpo.py` and `rewards.py`):
- Under DDP each process normalises its token-mean by its own token count, and DDP averages the
  gradients; with equal work per process this equals the global token mean.
- The reference model is the initial policy: with LoRA, the same weights with the adapters
  disabled (no second copy); without LoRA, a frozen copy kept out of checkpoints (it is
  re-created from `model_name_or_path` on resume).
- Sampling and the old/reference log-prob passes run in eval mode (no dropout), the training
  pass in train mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass, replace
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from torch import Tensor

from safegrpo_pl.grpo import LossSettings, aggregation_normalizer, group_advantages, grpo_loss
from safegrpo_pl.inputs import PromptBatch
from safegrpo_pl.metrics import build_safety_metrics, loggable_values, metric_inputs
from safegrpo_pl.model import LoraSettings, eos_token_ids, load_policy, vision_token_ids
from safegrpo_pl.rewards import RewardConfig, RewardParts, score_completions
from safegrpo_pl.rollout import Rollout, SamplingSettings, completion_logprobs, sample_groups
from safegrpo_pl.warmup import WarmupSettings, warmed_up_path

log = logging.getLogger(__name__)


LR_DECAYS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, total: int, kind: str) -> float:
    """The learning-rate factor after `step` of `total` optimiser steps: 1 for "constant",
    1 -> 0 along a line ("linear") or half a cosine ("cosine"). A decay lets a short run on a
    random-weight model (the demo) settle instead of ending on a large, noisy update."""
    if kind == "constant":
        return 1.0
    progress = min(max(step / total, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepTimer:
    """Wall-clock seconds per phase of a step (CUDA-synchronised), for logs and the benchmark."""

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
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out


class SafeGRPOModule(LightningModule):
    """SafeGRPO: group-relative policy optimisation with rule-based safety rewards.

    Args:
        model_name_or_path: hub id, local folder, or `tiny:ARCH?opts` for a tiny offline model.
        dtype: weight dtype ("float32", "bfloat16", "float16").
        lora: LoRA adapter settings; null trains all weights (reference = a frozen copy).
        load_in_4bit: QLoRA: NF4 base weights through bitsandbytes (needs `lora`).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run code shipped with a checkpoint; off unless you opt in.
        attn_implementation: attention kernel ("sdpa", "flash_attention_2", ...); null = auto.
        warmup: optional supervised format warm-up run before GRPO (for random-weight models
            that cannot yet write the format; see `safegrpo_pl.warmup`).
        group_size: completions sampled per prompt (G); at least 2.
        mini_batch_size: prompts per optimiser step; null = the whole rollout batch (one step).
        micro_batch_size: prompts per forward/backward pass (memory only: the gradient is the
            same for any value); null = the mini-batch.
        num_iterations: passes over each rollout batch (PPO epochs).
        kl_coef: weight of the KL-to-reference term in the loss (beta); 0 skips the reference.
        lr: AdamW learning rate (no warm-up).
        lr_decay: "constant" (the paper), or "linear" / "cosine" decay to 0 at
            `trainer.max_steps`.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping threshold.
        sampling: rollout sampling settings (temperature, top-p, top-k, max_new_tokens).
        val_sampling: validation/test decoding; null = greedy with `sampling.max_new_tokens`.
        loss: clipping, dual clip, KL estimator, aggregation and advantage settings.
        reward: rule-reward weights and refusal keywords.
        shared_prefix: encode each image and prefill each prompt once per group.
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny:qwen2_5_vl",
        dtype: str = "float32",
        lora: LoraSettings | None = None,
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        warmup: WarmupSettings | None = None,
        group_size: int = 8,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        num_iterations: int = 1,
        kl_coef: float = 0.01,
        lr: float = 1e-6,
        lr_decay: str = "constant",
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        sampling: SamplingSettings = SamplingSettings(),  # noqa: B008 (frozen dataclass)
        val_sampling: SamplingSettings | None = None,
        loss: LossSettings = LossSettings(),  # noqa: B008
        reward: RewardConfig = RewardConfig(),  # noqa: B008
        shared_prefix: bool = True,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (got {group_size}): GRPO compares the "
                "completions of one prompt with each other"
            )
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1 (got {num_iterations})")
        if lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay is {lr_decay!r}; choose one of {list(LR_DECAYS)}")
        self.save_hyperparameters()
        # Again as plain data: loggers cannot walk frozen dataclasses.
        self.save_hyperparameters(
            {k: asdict(v) if is_dataclass(v) else v for k, v in self.hparams.items()}
        )
        self.load_args = dict(
            dtype=dtype,
            lora=lora,
            load_in_4bit=load_in_4bit,
            gradient_checkpointing=gradient_checkpointing,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )
        self.warmup = warmup
        self.lr, self.weight_decay, self.max_grad_norm = lr, weight_decay, max_grad_norm
        self.lr_decay = lr_decay
        self.automatic_optimization = False  # one rollout feeds several optimiser steps
        self.model_name_or_path = model_name_or_path
        self.group_size = group_size
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.num_iterations = num_iterations
        self.kl_coef = kl_coef
        self.sampling = sampling
        # Greedy, with the rollout's length budget, unless set: a cap of its own would let a
        # model that never stops decode 4096 tokens per validation prompt.
        self.val_sampling = val_sampling or replace(sampling, do_sample=False)
        self.loss_settings = loss
        self.reward_config = reward
        self.shared_prefix = shared_prefix
        self.policy: Any = None
        self._reference: list[Any] = []  # a list keeps the frozen copy out of state_dict
        self.tokenizer: Any = None
        self.timer = StepTimer()
        self.strict_loading = lora is None  # LoRA checkpoints hold only the adapters

    # -- setup ----------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (and, without LoRA, its frozen reference) once, on any stage."""
        if self.policy is not None:
            return
        from transformers import AutoTokenizer

        from safegrpo_pl.tiny_models import resolve_model_path

        path = resolve_model_path(self.model_name_or_path)
        if self.warmup is not None:
            path = warmed_up_path(path, self.warmup, datamodule=self._datamodule())
        self.policy_path = path
        self.policy = load_policy(path, **self.load_args)
        trust = self.load_args["trust_remote_code"]
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        if self.load_args["lora"] is None and self.kl_coef > 0:
            reference = copy.deepcopy(self.policy).eval()
            reference.requires_grad_(False)
            self._reference = [reference]
        generation_config = getattr(self.policy, "generation_config", None)
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.suppress_ids = vision_token_ids(self.tokenizer)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def setup(self, stage: str) -> None:
        datamodule = self._datamodule()
        sources = sorted(getattr(datamodule, "sources", None) or [])
        self.val_metrics = build_safety_metrics("val/", sources)
        self.test_metrics = self.val_metrics.clone(prefix="test/")

    def on_fit_start(self) -> None:
        for reference in self._reference:
            reference.to(self.device)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters: check lora.target_modules")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_decay == "constant":
            return optimizer
        total = self.trainer.max_steps if self._trainer is not None else -1
        if total is None or total < 1:
            raise ValueError(
                f"lr_decay={self.lr_decay!r} decays to 0 at trainer.max_steps, which is not set "
                "(set --trainer.max_steps, or use lr_decay: constant)"
            )
        kind = self.lr_decay
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, kind)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}

    # -- the pieces of a step -------------------------------------------------------------

    def sample(self, batch: PromptBatch, group_size: int, settings: SamplingSettings) -> Rollout:
        """Sample `group_size` completions per prompt with the current policy."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            return sample_groups(
                self.policy,
                batch,
                group_size=group_size,
                settings=settings,
                tokenizer=self.tokenizer,
                eos_token_ids=self.eos_ids,
                pad_token_id=self.pad_id,
                suppress_token_ids=self.suppress_ids,
                shared_prefix=self.shared_prefix,
            )
        finally:
            self.policy.train(was_training)

    def score(self, batch: PromptBatch, rollout: Rollout) -> list[RewardParts]:
        """Rule rewards of every completion against its record's tags."""
        group = rollout.group_size
        return score_completions(
            rollout.texts,
            [t for t in batch.image_tags for _ in range(group)],
            [t for t in batch.text_tags for _ in range(group)],
            [t for t in batch.combine_tags for _ in range(group)],
            config=self.reward_config,
        )

    def _logprobs(self, model: Any, batch: PromptBatch, ids: Tensor, mask: Tensor) -> Tensor:
        return completion_logprobs(
            model,
            batch,
            ids,
            mask,
            group_size=self.group_size,
            temperature=self.sampling.temperature,
            shared_prefix=self.shared_prefix,
        )

    @torch.no_grad()
    def frozen_logprobs(self, batch: PromptBatch, rollout: Rollout, *, reference: bool) -> Tensor:
        """Log-probs (N, T) under the current policy (old) or the reference, in eval mode."""
        ids, mask = rollout.completion_ids, rollout.completion_mask
        was_training = self.policy.training
        self.policy.eval()
        try:
            if not reference:
                return self._logprobs(self.policy, batch, ids, mask)
            if self._reference:
                return self._logprobs(self._reference[0], batch, ids, mask)
            with self.policy.disable_adapter():
                return self._logprobs(self.policy, batch, ids, mask)
        finally:
            self.policy.train(was_training)

    def _groups(self, num_prompts: int, size: int | None) -> list[list[int]]:
        size = size or num_prompts
        if num_prompts % size:
            raise ValueError(
                f"the rollout batch of {num_prompts} prompts does not split into mini/micro-batches"
                f" of {size} prompts; make data.batch_size a multiple of it"
            )
        return [list(range(start, start + size)) for start in range(0, num_prompts, size)]

    def optimise(
        self,
        batch: PromptBatch,
        rollout: Rollout,
        advantages: Tensor,
        old_logp: Tensor | None,
        ref_logp: Tensor | None,
        prompts: Sequence[int],
    ) -> dict[str, Tensor]:
        """One optimiser step on the mini-batch of `prompts` (whole groups), micro-batched."""
        optimizer = self.optimizers()
        group = rollout.group_size
        rows_of = lambda ps: [p * group + i for p in ps for i in range(group)]  # noqa: E731
        mini_rows = rows_of(prompts)
        mini_mask = rollout.completion_mask[mini_rows]
        num_tokens = mini_mask.sum().clamp(min=1.0)
        # The mini-batch's denominator, shared by its micro-batches: any micro-batch size gives
        # the same gradient (SPEC section 4).
        normalizer = aggregation_normalizer(
            self.loss_settings.aggregation, mini_mask, self.sampling.max_new_tokens
        )
        optimizer.zero_grad()
        totals: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        micro_size = self.micro_batch_size or len(prompts)
        for start in range(0, len(prompts), micro_size):
            micro = list(prompts[start : start + micro_size])
            rows = rows_of(micro)
            mask = rollout.completion_mask[rows]
            width = int(mask.sum(1).max().item()) or 1
            mask, ids = mask[:, :width], rollout.completion_ids[rows, :width]
            with self.timer.phase("policy_forward_backward"):
                logp = self._logprobs(self.policy, batch.select(micro), ids, mask)
                old = logp.detach() if old_logp is None else old_logp[rows, :width]
                ref = None if ref_logp is None else ref_logp[rows, :width]
                loss, stats = grpo_loss(
                    logp,
                    old,
                    ref,
                    advantages[rows],
                    mask,
                    **self.loss_settings.kwargs(),
                    kl_coef=self.kl_coef,
                    loss_normalizer=normalizer,
                    max_completion_length=self.sampling.max_new_tokens,
                )
                self.manual_backward(loss)
            weight = mask.sum() / num_tokens  # token share of this micro-batch
            totals["loss"] += loss.detach()  # micro-batch losses add up to the mini-batch's
            totals["policy_loss"] += stats["policy_loss"]
            for key in ("kl", "clip_frac", "dual_clip_frac", "ratio_mean"):  # token means
                if key in stats:
                    totals[key] += stats[key] * weight
            totals["ratio_max"] = torch.maximum(totals["ratio_max"], stats["ratio_max"])
            totals["ratio_min"] = torch.minimum(
                totals.get("ratio_min", stats["ratio_min"]), stats["ratio_min"]
            )
        with self.timer.phase("optimizer"):
            grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
            totals["grad_norm"] = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else torch.zeros(())
            )
            self.clip_gradients(
                optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm"
            )
            optimizer.step()
            schedule = self.lr_schedulers()
            if schedule is not None:
                schedule.step()  # manual optimisation: Lightning leaves this to us
        return dict(totals)

    # -- Lightning hooks ------------------------------------------------------------------

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        with self.timer.phase("generation"):
            rollout = self.sample(batch, self.group_size, self.sampling)
        with self.timer.phase("reward"):
            parts = self.score(batch, rollout)
            rewards = torch.tensor([p.total for p in parts], device=self.device)
            advantages = group_advantages(
                rewards,
                self.group_size,
                scale=self.loss_settings.advantage_scale,
                eps=self.loss_settings.advantage_eps,
            )
        minibatches = self._groups(len(batch), self.mini_batch_size)
        steps = self.num_iterations * len(minibatches)
        old_logp = ref_logp = None
        if steps > 1:  # later steps see a moved policy: keep the sampling policy's log-probs
            with self.timer.phase("old_logprobs"):
                old_logp = self.frozen_logprobs(batch, rollout, reference=False)
        if self.kl_coef > 0:
            with self.timer.phase("ref_logprobs"):
                ref_logp = self.frozen_logprobs(batch, rollout, reference=True)
        step_stats: list[dict[str, Tensor]] = []
        for _ in range(self.num_iterations):
            for prompts in minibatches:
                step_stats.append(
                    self.optimise(batch, rollout, advantages, old_logp, ref_logp, prompts)
                )
        self._log_train(rollout, parts, rewards, advantages, step_stats, len(batch))

    def _log_train(
        self,
        rollout: Rollout,
        parts: Sequence[RewardParts],
        rewards: Tensor,
        advantages: Tensor,
        step_stats: Sequence[dict[str, Tensor]],
        batch_size: int,
    ) -> None:
        group = rollout.group_size
        grouped = rewards.view(-1, group)
        as_float = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
        logs: dict[str, Any] = {
            "train/reward": rewards.mean(),
            "train/reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "train/reward_format": as_float([p.format for p in parts]).mean(),
            "train/reward_tag": as_float([p.tag for p in parts]).mean(),
            "train/reward_behavior": as_float([p.behavior for p in parts]).mean(),
            "train/zero_var_groups": (grouped.std(dim=1) == 0).float().mean(),
            "train/completion_length": rollout.lengths.float().mean(),
            "train/truncated": rollout.truncated.float().mean(),
            "train/lr": self.optimizers().param_groups[0]["lr"],
        }
        for key in step_stats[0]:
            logs[f"train/{key}"] = torch.stack([s[key] for s in step_stats]).mean()
        seconds = self.timer.pop()
        logs.update({f"time/{k}": v for k, v in seconds.items()})
        logs["time/step_total"] = sum(seconds.values())
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, batch_size=batch_size)
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, batch_size=batch_size)
        self.log(
            "kl", logs.get("train/kl", 0.0), prog_bar=True, logger=False, batch_size=batch_size
        )

    def evaluate_batch(self, batch: PromptBatch) -> tuple[Rollout, list[RewardParts]]:
        """Decode one completion per prompt with `val_sampling` and score it."""
        rollout = self.sample(batch, 1, self.val_sampling)
        return rollout, self.score(batch, rollout)

    def _eval_step(self, batch: PromptBatch, metrics: Any) -> None:
        _, parts = self.evaluate_batch(batch)
        metrics.update(
            **metric_inputs(
                parts,
                batch.combine_tags,
                batch.image_tags,
                batch.text_tags,
                sources=[r.source for r in batch.records],
                device=self.device,
            )
        )

    def _log_eval_epoch(self, metrics: Any) -> None:
        # Metrics with no eligible record (e.g. no compositional pair) are NaN: leave them out.
        self.log_dict(loggable_values(metrics), sync_dist=False)
        metrics.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch(self.val_metrics)

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch(self.test_metrics)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """One decoded, scored response per record, as plain dicts (written by the CLI)."""
        rollout, parts = self.evaluate_batch(batch)
        return [
            {
                "id": r.id,
                "source": r.source,
                "prompt": r.prompt,
                "image_tag": r.image_tag,
                "text_tag": r.text_tag,
                "combine_tag": r.combine_tag,
                "completion": text,
                **asdict(p),
            }
            for r, text, p in zip(batch.records, rollout.texts, parts, strict=True)
        ]

    # -- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the random state (so a resumed run samples what an unbroken one would) and,
        with LoRA, only the trainable tensors: the frozen base is re-loaded from its path."""
        checkpoint["rng_states"] = _collect_rng_states()
        if self.load_args["lora"] is None:
            return
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if k in trainable
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            _restore_rng_states(checkpoint["rng_states"])


def _collect_rng_states() -> dict[str, Any]:
    # Only tensors and builtins, so that `torch.load(weights_only=True)` accepts them.
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
