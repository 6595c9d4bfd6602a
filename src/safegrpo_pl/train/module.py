"""`SafeGRPOModule`: the GRPO loop of SafeGRPO, by hand, in a LightningModule.

One training batch is one rollout batch of B prompts. Per batch: sample G completions per
prompt, score them with the rule rewards, normalise rewards within each group, compute the old
and reference log-probs once, then take `num_iterations` passes of optimiser steps over
mini-batches of whole groups (docs/method.md section 4). Lightning's manual optimisation is used because
one rollout feeds several optimiser steps; `trainer.max_steps` therefore counts optimiser steps.

Departures and choices (all deliberate; see also `rl/grpo.py` and `core/rewards.py`):
- On several processes (DDP, or FSDP2 through `configure_model`), each rank samples its own
  prompts with its own generator (`sampling_generator`, seeded from the global seed and the
  rank), and the loss is the token-mean over the mini-batch of ALL ranks: the denominator is
  all-reduced and the gradient averaging of the strategy is undone (`safegrpo_pl.rl.distributed`),
  so one step equals a one-process step on the same global batch.
- The reference model is the initial policy: with LoRA, the same weights with the adapters
  disabled (no second copy); without LoRA, a frozen copy kept out of checkpoints (it is
  re-created from `policy.name_or_path` on resume).
- No dropout anywhere: sampling and the old/reference passes run in eval mode, the training
  pass in train mode with dropout off (`PolicyRunner`). The first mini-batch of a rollout
  takes its old log-probs from its own training forward (the weights have not moved yet), so
  its ratio is exactly 1 and the old pass skips it.
- With `dynamic_sampling` (DAPO's, off by default), a training batch is a draw: groups whose
  rewards are all equal are dropped, the others held (`HeldGroups`, saved in checkpoints), and
  the update runs once a rollout batch of them is held (docs/method.md section 4.16).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import Any

import torch
from lightning import LightningModule
from torch import Tensor

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import RewardConfig, RewardParts, score_completions
from safegrpo_pl.data.rank_padding import counted
from safegrpo_pl.policy.inputs import PromptBatch, PromptEncoder
from safegrpo_pl.policy.model import PolicySettings
from safegrpo_pl.policy.precision import DTYPES, check_trainable_dtype
from safegrpo_pl.rl.distributed import (
    advantages_over_ranks,
    check_equal_across_ranks,
    gather_rewards,
    global_seed,
    min_over_ranks,
    sampling_generator,
)
from safegrpo_pl.rl.grpo import (
    DynamicSampling,
    LossSettings,
    completion_rows,
    groups_to_hold,
    informative_groups,
    loss_mask,
    overlong_penalty,
    prompt_chunks,
    repeat_per_completion,
)
from safegrpo_pl.rollout.chunking import pad_right
from safegrpo_pl.rollout.sampling import Rollout, SamplingSettings
from safegrpo_pl.train.checkpoints import gather_from_ranks, read_extras, write_extras
from safegrpo_pl.train.fsdp import shard_models
from safegrpo_pl.train.metrics import build_safety_metrics, loggable_values, metric_inputs
from safegrpo_pl.train.policy_runner import PolicyRunner
from safegrpo_pl.train.update import (
    NonFiniteGuard,
    PolicyUpdate,
    ScoredRollout,
    StepFigures,
    StepTimer,
    UpdateSettings,
)
from safegrpo_pl.train.warmup import WarmupSettings, already_warmed_up, warmed_up_path

LR_DECAYS = ("constant", "linear", "cosine")


def lr_multiplier(step: int, total: int | None, kind: str, warmup_steps: int = 0) -> float:
    """The learning-rate factor for optimiser step `step` (from 0) of `total`.

    First `warmup_steps` steps rising along a line to 1 (step `i` at `(i + 1) / (warmup + 1)`),
    then 1 for "constant", 1 -> 0 along a line ("linear") or half a cosine ("cosine") over the
    remaining steps (a run shorter than its warm-up never reaches the full rate: a short check
    run of a config keeps the config's schedule). The warm-up keeps AdamW's first steps, which
    move every weight by about the full learning rate whatever the gradient's size, from
    undoing what a model already writes; the decay lets a short run on a random-weight model
    (the demo) settle instead of ending on a large, noisy update.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    assert total is not None
    span = max(total - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OptimizerPlan:
    """AdamW's settings and the decay; `build` returns what `configure_optimizers` returns."""

    lr: float
    weight_decay: float
    lr_decay: str
    max_steps: int | None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay is {self.lr_decay!r}; choose one of {list(LR_DECAYS)}")
        if self.warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps is {self.warmup_steps}; expected >= 0")

    def build(self, params: Iterable[torch.nn.Parameter]) -> Any:
        """AdamW over the trainable `params`, with a per-step LambdaLR unless constant."""
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("the policy has no trainable parameters: check lora.target_modules")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_decay == "constant" and self.warmup_steps == 0:
            return optimizer
        total, kind, warmup = self.max_steps, self.lr_decay, self.warmup_steps
        if kind != "constant" and (total is None or total < 1):
            raise ValueError(
                f"lr_decay={kind!r} decays to 0 at trainer.max_steps, which is not set "
                "(set --trainer.max_steps or --model.lr_decay_steps, or use lr_decay: constant)"
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, total, kind, warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule}}


def continue_schedule(schedule: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimiser's learning rates to what `schedule` gives at its restored step.

    A resumed run restores the rates the first run's schedule set for its next step; with a
    longer `max_steps` the schedule is now another one (stretched), and without this its first
    step would still use the old rate (0 at the end of a finished decay). At the same
    `max_steps` it sets what was restored, bit for bit.
    """
    groups = schedule.optimizer.param_groups
    for group, base, factor in zip(groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["lr"] = base * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in groups]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draw:
    """One rollout batch, sampled and scored (or the informative groups of several).

    Attributes:
        batch: the B prompts.
        rollout: their B * G completions.
        parts: the N rewards' parts.
        rewards: (N,) the rule rewards (before any overlong penalty).
    """

    batch: PromptBatch
    rollout: Rollout
    parts: list[RewardParts]
    rewards: Tensor

    def __len__(self) -> int:
        return len(self.batch)

    def select(self, prompts: Sequence[int]) -> Draw:
        """The groups of `prompts`, in that order."""
        r = self.rollout
        rows = completion_rows(prompts, r.group_size)
        index = torch.tensor(rows, dtype=torch.long, device=r.completion_ids.device)
        rollout = Rollout(
            completion_ids=r.completion_ids[index],
            completion_mask=r.completion_mask[index],
            texts=[r.texts[i] for i in rows],
            lengths=r.lengths[index],
            truncated=r.truncated[index],
            group_size=r.group_size,
            sampler_logp=None if r.sampler_logp is None else r.sampler_logp[index],
        )
        parts = [self.parts[i] for i in rows]
        return Draw(self.batch.select(prompts), rollout, parts, self.rewards[index])

    @staticmethod
    def join(draws: Sequence[Draw], pad_id: int) -> Draw:
        """The groups of `draws`, in order; completions right-padded with `pad_id` (masked)."""
        rollouts = [d.rollout for d in draws]
        sampler = None
        if rollouts[0].sampler_logp is not None:
            sampler = pad_right([r.sampler_logp for r in rollouts], 0.0)
        rollout = Rollout(
            completion_ids=pad_right([r.completion_ids for r in rollouts], pad_id),
            completion_mask=pad_right([r.completion_mask for r in rollouts], 0.0),
            texts=[t for r in rollouts for t in r.texts],
            lengths=torch.cat([r.lengths for r in rollouts]),
            truncated=torch.cat([r.truncated for r in rollouts]),
            group_size=rollouts[0].group_size,
            sampler_logp=sampler,
        )
        batch = PromptBatch.join([d.batch for d in draws], pad_id)
        parts = [p for d in draws for p in d.parts]
        return Draw(batch, rollout, parts, torch.cat([d.rewards for d in draws]))

    def state_dict(self) -> dict[str, Any]:
        """Plain data on the CPU (`torch.load(weights_only=True)` reads it); the records
        without their images, which nothing reads after scoring."""
        b, r = self.batch, self.rollout
        cpu = lambda x: None if x is None else x.detach().cpu()  # noqa: E731
        return {
            "records": [asdict(replace(record, image=None)) for record in b.records],
            "input_ids": cpu(b.input_ids),
            "attention_mask": cpu(b.attention_mask),
            "model_kwargs": {k: cpu(v) for k, v in b.model_kwargs.items()},
            "completion_ids": cpu(r.completion_ids),
            "completion_mask": cpu(r.completion_mask),
            "texts": list(r.texts),
            "lengths": cpu(r.lengths),
            "truncated": cpu(r.truncated),
            "group_size": r.group_size,
            "sampler_logp": cpu(r.sampler_logp),
            "parts": [asdict(p) for p in self.parts],
            "rewards": cpu(self.rewards),
        }

    @staticmethod
    def from_state(state: dict[str, Any], device: torch.device) -> Draw:
        """The `Draw` that `state_dict` saved, on `device`."""
        on = lambda x: None if x is None else x.to(device)  # noqa: E731
        batch = PromptBatch(
            records=[SafetyRecord(**record) for record in state["records"]],
            input_ids=on(state["input_ids"]),
            attention_mask=on(state["attention_mask"]),
            model_kwargs={k: on(v) for k, v in state["model_kwargs"].items()},
        )
        rollout = Rollout(
            completion_ids=on(state["completion_ids"]),
            completion_mask=on(state["completion_mask"]),
            texts=list(state["texts"]),
            lengths=on(state["lengths"]),
            truncated=on(state["truncated"]),
            group_size=int(state["group_size"]),
            sampler_logp=on(state["sampler_logp"]),
        )
        parts = [RewardParts(**p) for p in state["parts"]]
        return Draw(batch, rollout, parts, on(state["rewards"]))


class HeldGroups:
    """Dynamic sampling between rollout batches (docs/method.md section 4.16): the informative
    groups held for the next update, the draws made and the groups dropped since the last one.

    Every process holds its own groups; the decision to update, and how many groups each
    trains on, come from the smallest count over processes, so all take the same steps.
    """

    def __init__(self, settings: DynamicSampling) -> None:
        self.settings = settings
        self.held: Draw | None = None
        self.draws = 0
        self.dropped = 0

    def add(
        self, draw: Draw, informative: Tensor, target: int, multiple: int, pad_id: int
    ) -> tuple[Draw | None, dict[str, float]]:
        """Hold `draw`'s informative groups ((B,) bool `informative`) up to `target` in all.

        Returns (None, {}) while more draws are due; else the groups to train on, the same
        number on every process (at most `target`, a multiple of `multiple`: whole
        mini-batches), and the counts to log; the cycle then starts afresh. Raises on every
        process when the draw cap leaves no whole mini-batch (as verl does at its cap: a run
        that takes no step would never reach `max_steps`). A collective under DDP: every
        process calls it once per draw.
        """
        self.draws += 1
        self.dropped += int((~informative).sum())
        take = groups_to_hold(informative, target - len(self.held or ()))
        device = draw.rewards.device
        if self.held is not None and self.held.rewards.device != device:  # read on the CPU
            self.held = Draw.from_state(self.held.state_dict(), device)
        if take:
            piece = draw.select(take)
            self.held = piece if self.held is None else Draw.join([self.held, piece], pad_id)
        count = min_over_ranks(len(self.held or ()))
        if count < target and self.draws <= self.settings.max_extra_draws:
            return None, {}
        kept = count // multiple * multiple
        counts = {
            "groups_kept": float(kept),
            "groups_dropped": float(self.dropped),
            "extra_draws": float(self.draws - 1),
        }
        if kept == 0 or self.held is None:
            raise RuntimeError(
                f"dynamic sampling: {self.draws} rollout batch(es) in a row left fewer than "
                f"{multiple} informative group(s) (whole mini-batches) on some process: every "
                "group's rewards were equal. Raise model.dynamic_sampling.max_extra_draws, or "
                "set model.dynamic_sampling to null (the policy may have collapsed)"
            )
        ready = self.held.select(range(kept))
        self.held, self.draws, self.dropped = None, 0, 0
        return ready, counts

    def state_dict(self) -> dict[str, Any]:
        held = None if self.held is None else self.held.state_dict()
        return {"held": held, "draws": self.draws, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s groups on the CPU (the next draw moves them to its device:
        Lightning restores a checkpoint before it places the module)."""
        held = state["held"]
        self.held = None if held is None else Draw.from_state(held, torch.device("cpu"))
        self.draws, self.dropped = int(state["draws"]), int(state["dropped"])


HELD_KEY = "dynamic_sampling"
# What `training_step` returns for a rollout batch whose groups are held back for a later update
# (dynamic sampling): it logged nothing and took no optimiser step.
HELD_BACK = {"held_back": True}


@dataclass(frozen=True)
class EvalOutputs:
    """What a validation or test step returns: each row's decoded response and its rewards,
    in the batch's order, padding rows included (the report callback keeps a few)."""

    texts: list[str]
    parts: list[RewardParts]


class SafeGRPOModule(LightningModule):
    """SafeGRPO: group-relative policy optimisation with rule-based safety rewards.

    Args:
        policy: which model to train and how to load it (path, dtype, LoRA, 4-bit, gradient
            checkpointing, attention kernel).
        warmup: optional supervised format warm-up run before GRPO (for random-weight models
            that cannot yet write the format; see `safegrpo_pl.train.warmup`). It is a stage of its
            own: `warm_start` runs it, and the CLI calls that before every subcommand.
        group_size: completions sampled per prompt (G); at least 2.
        mini_batch_size: prompts per optimiser step; null = the whole rollout batch (one step).
        micro_batch_size: prompts per forward/backward pass (memory only: the gradient is the
            same for any value); null = the mini-batch.
        rollout_micro_batch_size: prompts sampled, and re-scored by the old/reference passes,
            at once (whole groups; memory only); null = the whole rollout batch.
        num_iterations: passes over each rollout batch (PPO epochs).
        kl_coef: weight of the KL-to-reference term in the loss (beta); 0 skips the reference.
        lr: AdamW learning rate.
        lr_decay: "constant" (the paper), or "linear" / "cosine" decay to 0 at
            `trainer.max_steps`.
        lr_warmup_steps: optimiser steps over which the learning rate rises linearly to `lr`
            (0, the paper: none).
        lr_decay_steps: the optimiser step at which `lr_decay` reaches 0 (it stays 0 after);
            null = `trainer.max_steps`. Set it to the planned length when a run is stopped
            early and resumed with a larger `max_steps`, so the schedule is not stretched.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping threshold.
        sampling: rollout sampling settings (temperature, top-p, top-k, max_new_tokens).
        val_sampling: validation/test decoding; null = greedy with `sampling.max_new_tokens`.
        loss: clipping, dual clip, KL estimator, aggregation and advantage settings.
        reward: rule-reward weights and refusal keywords.
        shared_prefix: encode each image and prefill each prompt once per group.
        recompute_head: the training forward keeps no full-vocabulary logits: when the scored
            tokens span more than one LM-head chunk (2**26 logits), each chunk's logits are
            recomputed in backward (one more head pass) instead of kept (docs/scale.md).
        fsdp_compute_dtype: under `ModelParallelStrategy` (FSDP2), the dtype weights are
            gathered in for compute ("bfloat16"), the shards and AdamW keeping the loaded
            dtype (`model.policy.dtype: float32`); null: the loaded dtype.
        max_consecutive_skips: optimiser steps in a row with a non-finite loss or gradient
            (each skipped, see `safegrpo_pl.train.update`) after which the run stops.
        dynamic_sampling: DAPO's dynamic sampling (`DynamicSampling`, docs/method.md section
            4.16): groups with all-equal rewards are dropped and more rollout batches drawn
            before an update; null (the paper): every rollout batch is trained on.
    """

    def __init__(
        self,
        policy: PolicySettings = PolicySettings(),  # noqa: B008 (frozen dataclass)
        warmup: WarmupSettings | None = None,
        group_size: int = 8,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        rollout_micro_batch_size: int | None = None,
        num_iterations: int = 1,
        kl_coef: float = 0.01,
        lr: float = 1e-6,
        lr_decay: str = "constant",
        lr_warmup_steps: int = 0,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.01,
        max_grad_norm: float = 1.0,
        sampling: SamplingSettings = SamplingSettings(),  # noqa: B008
        val_sampling: SamplingSettings | None = None,
        loss: LossSettings = LossSettings(),  # noqa: B008
        reward: RewardConfig = RewardConfig(),  # noqa: B008
        shared_prefix: bool = True,
        recompute_head: bool = True,
        fsdp_compute_dtype: str | None = None,
        max_consecutive_skips: int = 5,
        dynamic_sampling: DynamicSampling | None = None,
    ) -> None:
        super().__init__()
        if group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 (got {group_size}): GRPO compares the "
                "completions of one prompt with each other"
            )
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be at least 1 (got {num_iterations})")
        self.save_hyperparameters()  # collects the arguments above
        # Saved again as plain data: loggers cannot walk frozen dataclasses, nor can
        # `torch.load(weights_only=True)` read them back.
        self.save_hyperparameters(
            {k: asdict(v) if is_dataclass(v) else v for k, v in self.hparams.items()}
        )
        self.settings = policy
        self.warmup = warmup
        if lr_decay_steps is not None and lr_decay_steps < 1:
            raise ValueError(f"lr_decay_steps is {lr_decay_steps}; expected >= 1 or null")
        self.optimizer_plan = OptimizerPlan(
            lr, weight_decay, lr_decay, max_steps=lr_decay_steps, warmup_steps=lr_warmup_steps
        )
        self.max_grad_norm = max_grad_norm
        self.automatic_optimization = False  # one rollout feeds several optimiser steps
        self.group_size = group_size
        self.mini_batch_size = mini_batch_size
        self.micro_batch_size = micro_batch_size
        self.rollout_micro_batch_size = rollout_micro_batch_size
        self.num_iterations = num_iterations
        self.kl_coef = kl_coef
        self.sampling = sampling
        # Greedy, with the rollout's length budget, unless set: a cap of its own would let a
        # model that never stops decode 4096 tokens per validation prompt.
        self.val_sampling = val_sampling or replace(sampling, do_sample=False)
        self.loss_settings = loss
        self.reward_config = reward
        self.shared_prefix = shared_prefix
        self.recompute_head = recompute_head
        self.fsdp_compute_dtype = fsdp_compute_dtype
        self.guard = NonFiniteGuard(max_consecutive_skips)
        self.held_groups = None if dynamic_sampling is None else HeldGroups(dynamic_sampling)
        self.policy: Any = None
        self.policy_path: str | None = None  # the folder loaded: the warm-up's, once it ran
        self._reference: list[Any] = []  # a list keeps the frozen copy out of state_dict
        self.tokenizer: Any = None
        self.timer = StepTimer()
        self.sampling_generator: torch.Generator | None = None  # per rank; made in `setup`
        self.strict_loading = policy.lora is None  # LoRA checkpoints hold only the adapters

    # -- setup ----------------------------------------------------------------------------

    def warm_start(
        self, records: Sequence[SafetyRecord], encoder: PromptEncoder, dataset_key: dict[str, Any]
    ) -> str:
        """Run the format warm-up on `records` (or reuse its cached result); returns its folder.

        The warm-up is a stage before GRPO, not part of loading: the CLI calls this before
        every subcommand with the datamodule's train records, its prompt encoder and what
        identifies the data set (`SafeTagDataModule.warmup_key()`), and `configure_model`
        then loads the warmed-up folder.
        """
        if self.warmup is None:
            raise ValueError("warm_start needs model.warmup settings; it is null")
        from safegrpo_pl.policy.tiny_models import resolve_model_path

        base = resolve_model_path(self.settings.name_or_path)
        done = already_warmed_up(base)
        if done is not None:
            log.warning("format warm-up skipped: %s; loading it as it is", done)
            self.policy_path = base
            return base
        self.policy_path = warmed_up_path(
            base, self.warmup, records=records, encoder=encoder, dataset_key=dataset_key
        )
        return self.policy_path

    def configure_model(self) -> None:
        """Load the policy (and, without LoRA, its frozen reference) once, on any stage."""
        if self.policy is not None:
            return
        from safegrpo_pl.policy.tiny_models import resolve_model_path

        if self.warmup is not None and self.policy_path is None:
            raise ValueError(
                "model.warmup is set but the warm-up stage has not run: call "
                "module.warm_start(records, encoder, dataset_key) before the Trainer (the CLI "
                "does), or set model.warmup to null"
            )
        self.policy_path = self.policy_path or resolve_model_path(self.settings.name_or_path)
        self.runner = PolicyRunner.load(
            self.settings,
            self.policy_path,
            kl_coef=self.kl_coef,
            shared_prefix=self.shared_prefix,
            rollout_chunk=self.rollout_micro_batch_size,
        )
        self.policy = self.runner.model
        self.tokenizer = self.runner.tokenizer
        self._reference = [] if self.runner.reference is None else [self.runner.reference]
        settings = UpdateSettings(
            loss=self.loss_settings,
            kl_coef=self.kl_coef,
            max_grad_norm=self.max_grad_norm,
            micro_batch_size=self.micro_batch_size,
            temperature=self.sampling.temperature,
            max_new_tokens=self.sampling.max_new_tokens,
            recompute_head=self.recompute_head,
        )
        self.policy_update = PolicyUpdate(settings, self.runner, self.guard, self.timer)
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2, see `sharding`
            shard_models(self.policy, self._reference, self.device_mesh, self.fsdp_compute_dtype)

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        sources = sorted(getattr(datamodule, "sources", None) or [])
        self.val_metrics = build_safety_metrics("val/", sources)
        self.test_metrics = self.val_metrics.clone(prefix="test/")
        if self.sampling_generator is None:
            device = trainer.strategy.root_device if trainer is not None else self.device
            rank = trainer.global_rank if trainer is not None else 0
            self.sampling_generator = sampling_generator(global_seed(), rank, device)

    def on_fit_start(self) -> None:
        trainable = self.settings.trainable_dtype
        check_trainable_dtype(self.policy, None if trainable is None else DTYPES[trainable])
        self.runner.place_reference()  # the precision plugin has cast the policy by now
        self._reference = [] if self.runner.reference is None else [self.runner.reference]

    def configure_optimizers(self) -> Any:
        plan = self.optimizer_plan
        if plan.max_steps is None and self._trainer is not None:
            plan = replace(plan, max_steps=self.trainer.max_steps)
        return plan.build(self.policy.parameters())

    def on_train_start(self) -> None:
        schedule = self.lr_schedulers()
        if schedule is not None:  # after a resume: the schedule of this run's max_steps
            continue_schedule(schedule)

    # -- the pieces of a step -------------------------------------------------------------

    def sample(
        self,
        batch: PromptBatch,
        group_size: int,
        settings: SamplingSettings,
        keep_logprobs: bool = False,
    ) -> Rollout:
        """Sample `group_size` completions per prompt with the current policy (`keep_logprobs`:
        with the sampler's own log-probs)."""
        return self.runner.sample(
            batch,
            group_size,
            settings,
            generator=self.sampling_generator,
            keep_logprobs=keep_logprobs,
        )

    def shaped_rewards(self, rewards: Tensor, rollout: Rollout) -> tuple[Tensor, Tensor | None]:
        """(rewards the advantages are computed from (N,), the overlong penalty (N,) or None):
        the rule rewards plus DAPO's soft overlong penalty when `loss.overlong_buffer` > 0."""
        settings = self.loss_settings
        if settings.overlong_buffer == 0:
            return rewards, None
        penalty = overlong_penalty(
            rollout.lengths,
            self.sampling.max_new_tokens,
            settings.overlong_buffer,
            settings.overlong_penalty_factor,
        ).to(rewards)
        return rewards + penalty, penalty

    def score(self, batch: PromptBatch, rollout: Rollout) -> list[RewardParts]:
        """Rule rewards of every completion against its record's tags."""
        group = rollout.group_size
        return score_completions(
            rollout.texts,
            repeat_per_completion(batch.image_tags, group),
            repeat_per_completion(batch.text_tags, group),
            repeat_per_completion(batch.combine_tags, group),
            config=self.reward_config,
        )

    def frozen_logprobs(
        self, batch: PromptBatch, rollout: Rollout, *, reference: bool, skip: Sequence[int] = ()
    ) -> Tensor:
        """Log-probs (N, T) under the current policy (old) or the reference, in eval mode; the
        rows of prompts in `skip` are left 0."""
        temperature = self.sampling.temperature
        return self.runner.frozen_logprobs(
            batch, rollout, reference=reference, temperature=temperature, skip=skip
        )

    def optimise(
        self, scored: ScoredRollout, prompts: Sequence[int], fresh: bool = False
    ) -> StepFigures:
        """One optimiser step on the mini-batch of `prompts` (`PolicyUpdate.step`)."""
        return self.policy_update.step(self, scored, prompts, fresh)

    # -- Lightning hooks ------------------------------------------------------------------

    def draw(self, batch: PromptBatch) -> Draw:
        """Sample G completions per prompt of `batch` and score them."""
        with self.timer.phase("generation"):
            rollout = self.sample(
                batch, self.group_size, self.sampling, self.loss_settings.keeps_sampler_logprobs
            )
        with self.timer.phase("reward"):
            parts = self.score(batch, rollout)
            rewards = torch.tensor([p.total for p in parts], device=self.device)
        return Draw(batch, rollout, parts, rewards)

    def training_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, bool] | None:
        draw, counts = self.draw(batch), {}
        if self.held_groups is not None:  # dynamic sampling: update once enough are held
            shaped, _ = self.shaped_rewards(draw.rewards, draw.rollout)
            informative = informative_groups(shaped, self.group_size)
            multiple = self.mini_batch_size or 1
            pad_id = self.runner.decode_ids.pad
            ready, counts = self.held_groups.add(draw, informative, len(batch), multiple, pad_id)
            if ready is None:
                self._log_nothing_this_batch()
                return HELD_BACK
            draw = ready
        self.update(draw, counts)
        return None

    def _log_nothing_this_batch(self) -> None:
        """Lightning logs the last `self.log` values of `training_step` again at the end of
        every batch until they are logged anew; a batch held back logs nothing instead (one
        row per update, at its optimiser step)."""
        results = self._trainer._results if self._trainer is not None else None
        if results is not None:
            results.reset(metrics=False, fx="training_step")

    def update(self, draw: Draw, counts: dict[str, float]) -> None:
        """Advantages, old and reference log-probs, then `num_iterations` passes of optimiser
        steps over the mini-batches of `draw`; logs the figures (and dynamic sampling's
        `counts`)."""
        settings = self.loss_settings
        batch, rollout, parts, rewards = draw.batch, draw.rollout, draw.parts, draw.rewards
        with self.timer.phase("reward"):
            shaped, penalty = self.shaped_rewards(rewards, rollout)
            advantages, every_rank = advantages_over_ranks(
                shaped, self.group_size, settings, lengths=rollout.lengths
            )
        truncated = rollout.truncated if settings.mask_truncated else None
        mask = loss_mask(
            rollout.completion_mask, shaped, self.group_size, settings.drop_zero_variance, truncated
        )
        minibatches = prompt_chunks(len(batch), self.mini_batch_size)
        steps = self.num_iterations * len(minibatches)
        check_equal_across_ranks("the number of optimiser steps per rollout batch", steps)
        old_logp = ref_logp = None
        if steps > 1:  # later steps see a moved policy: keep the sampling policy's log-probs
            with self.timer.phase("old_logprobs"):  # the first mini-batch's come from its step
                old_logp = self.frozen_logprobs(
                    batch, rollout, reference=False, skip=minibatches[0]
                )
        if self.kl_coef > 0:
            with self.timer.phase("ref_logprobs"):
                ref_logp = self.frozen_logprobs(batch, rollout, reference=True)
        scored = ScoredRollout(batch, rollout, advantages, old_logp, ref_logp, mask)
        step_figures: list[StepFigures] = []
        for iteration in range(self.num_iterations):
            for index, prompts in enumerate(minibatches):
                fresh = iteration == 0 and index == 0
                step_figures.append(self.optimise(scored, prompts, fresh))
        if penalty is not None:  # the rule reward is logged on its own, the penalty apart
            every_rank = gather_rewards(rewards)
        self._log_train(rollout, parts, every_rank, step_figures, len(batch), penalty, counts)

    def _log_train(
        self,
        rollout: Rollout,
        parts: Sequence[RewardParts],
        rewards: Tensor,
        step_figures: Sequence[StepFigures],
        batch_size: int,
        penalty: Tensor | None = None,
        counts: dict[str, float] | None = None,
    ) -> None:
        figures = rollout_figures(
            rewards, parts, rollout.lengths, rollout.truncated, rollout.group_size
        )
        if penalty is not None:
            figures["overlong_penalty"] = penalty.float().mean()
        figures.update(mean_over_steps(step_figures))
        figures.update({k: torch.tensor(v) for k, v in (counts or {}).items()})
        logs: dict[str, Any] = {f"train/{k}": v for k, v in figures.items()}
        logs["train/lr"] = self.optimizers().param_groups[0]["lr"]
        logs["train/skipped_steps"] = float(self.guard.skipped)
        seconds = self.timer.pop()
        logs.update({f"time/{k}": v for k, v in seconds.items()})
        logs["time/step_total"] = sum(seconds.values())
        # The loggers' step is the number of optimiser steps done, as in the report's curves
        # (Lightning would count rollout batches, which differ with several steps per batch).
        logs["step"] = float(self.global_step)
        # Means over ranks (each holds the same number of completions): loss figures are
        # already global, and reward, reward_std and zero_var_groups come from every rank.
        options = {"batch_size": batch_size, "sync_dist": True}
        self.log_dict(logs, on_step=True, on_epoch=False, prog_bar=False, **options)
        self.log("reward", logs["train/reward"], prog_bar=True, logger=False, **options)
        self.log("kl", logs.get("train/kl", 0.0), prog_bar=True, logger=False, **options)

    def evaluate_batch(self, batch: PromptBatch) -> tuple[Rollout, list[RewardParts]]:
        """Decode one completion per prompt with `val_sampling` and score it."""
        rollout = self.sample(batch, 1, self.val_sampling)
        return rollout, self.score(batch, rollout)

    def _eval_step(self, batch: PromptBatch, metrics: Any) -> EvalOutputs:
        """Decode, score and update `metrics`; returns every row's response and rewards, in
        the batch's order (the report callback shows a few of them)."""
        rollout, all_parts = self.evaluate_batch(batch)  # padding too: every rank decodes alike
        outputs = EvalOutputs(rollout.texts, all_parts)
        records, parts = counted(batch.records, all_parts)  # the sampler's padding never counts
        if not records:
            return outputs
        metrics.update(
            **metric_inputs(
                parts,
                [r.combine_tag for r in records],
                [r.image_tag for r in records],
                [r.text_tag for r in records],
                sources=[r.source for r in records],
                device=self.device,
            )
        )
        return outputs

    def _log_eval_epoch(self, metrics: Any) -> None:
        # Metrics with no eligible record (e.g. no compositional pair) are NaN: leave them out.
        # `compute` has summed the counts over ranks already, so every rank holds the same
        # values; sync_dist (a mean of equal values) only tells Lightning so.
        self.log_dict(loggable_values(metrics), sync_dist=True)
        self.log("step", float(self.global_step), sync_dist=True)  # training's step numbering
        metrics.reset()

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> EvalOutputs:
        return self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch(self.val_metrics)

    def test_step(self, batch: PromptBatch, batch_idx: int) -> EvalOutputs:
        return self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch(self.test_metrics)

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """One decoded, scored response per record, as plain dicts (written by the CLI)."""
        rollout, parts = self.evaluate_batch(batch)
        return prediction_rows(*counted(batch.records, rollout.texts, parts))

    # -- checkpoints ----------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every process's random state, the policy's identity, the skipped-step count, and
        with LoRA only the adapters (`safegrpo_pl.train.checkpoints.write_extras`)."""
        write_extras(self, checkpoint)
        if self.held_groups is not None:  # groups held between draws: one entry per rank
            checkpoint[HELD_KEY] = {"ranks": gather_from_ranks(self.held_groups.state_dict())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another policy or with missing / unexpected weights, then
        restore the random state (`safegrpo_pl.train.checkpoints.read_extras`)."""
        read_extras(self, checkpoint)
        if self.held_groups is not None and HELD_KEY in checkpoint:
            ranks = checkpoint[HELD_KEY]["ranks"]
            if len(ranks) == self.trainer.world_size:
                self.held_groups.load_state_dict(ranks[self.global_rank])
            else:
                log.warning(
                    "the checkpoint holds dynamic sampling's groups of %d process(es), this "
                    "run has %d: they are dropped and the next update starts a fresh cycle",
                    len(ranks),
                    self.trainer.world_size,
                )


def rollout_figures(
    rewards: Tensor, parts: Sequence[RewardParts], lengths: Tensor, truncated: Tensor, group: int
) -> dict[str, Tensor]:
    """What the sampled completions scored (`train/...` figures, one row per rollout batch).

    Args:
        rewards: (N,) total rewards.
        parts: the N rewards' parts.
        lengths: (N,) completion lengths in tokens.
        truncated: (N,) bool, cut by the length budget.
        group: G, completions per prompt.
    """
    as_float = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return {
        "reward": rewards.mean(),
        "reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
        "reward_format": as_float([p.format for p in parts]).mean(),
        "reward_tag": as_float([p.tag for p in parts]).mean(),
        "reward_behavior": as_float([p.behavior for p in parts]).mean(),
        "zero_var_groups": (rewards.view(-1, group).std(dim=1) == 0).float().mean(),
        "completion_length": lengths.float().mean(),
        "truncated": truncated.float().mean(),
    }


def mean_over_steps(step_figures: Sequence[StepFigures]) -> dict[str, Tensor]:
    """Each figure of the optimiser steps of one rollout batch, averaged over the steps."""
    rows = [figures.as_dict() for figures in step_figures]
    return {key: torch.stack([row[key] for row in rows]).mean() for key in rows[0]}


def prediction_rows(
    records: Sequence[SafetyRecord], texts: Sequence[str], parts: Sequence[RewardParts]
) -> list[dict[str, Any]]:
    """One plain dict per record: its labels, the decoded response and its reward parts."""
    return [
        {
            "id": r.id,
            "source": r.source,
            "novelty": r.novelty,
            "prompt": r.prompt,
            "image_tag": r.image_tag,
            "text_tag": r.text_tag,
            "combine_tag": r.combine_tag,
            "completion": text,
            **asdict(p),
        }
        for r, text, p in zip(records, texts, parts, strict=True)
    ]
