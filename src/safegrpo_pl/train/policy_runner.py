"""`PolicyRunner`: the loaded policy, its frozen reference and token ids, and the three things a
GRPO step asks of them: sample groups, score completions with grad, score them without.

Dropout: none anywhere in GRPO. Sampling and the old/reference log-prob passes run in eval
mode; the training pass keeps the caller's train mode (gradient checkpointing depends on it)
with every dropout module switched off, so old and new log-probs come from the same function
and the importance ratio is 1 until the weights move (docs/method.md section 6.3).

Memory: `rollout_chunk` prompts (whole groups) are sampled and re-scored at a time
(`safegrpo_pl.rollout.chunking`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.policy.model import DecodeIds, PolicySettings
from safegrpo_pl.policy.precision import DTYPES, cast_trainable, place_reference
from safegrpo_pl.rollout.chunking import chunked_scores, rollout_chunks
from safegrpo_pl.rollout.logprobs import completion_logprobs, completion_logprobs_and_entropy
from safegrpo_pl.rollout.prefill import eval_mode
from safegrpo_pl.rollout.sampling import Rollout, SamplingSettings, sample_groups
from safegrpo_pl.train.fsdp import gathered_weights, is_sharded


@contextlib.contextmanager
def dropout_off(model: Any) -> Iterator[None]:
    """Put every dropout module of `model` in eval mode for a block (the rest keeps its mode)."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    modes = [m.training for m in dropouts]
    for m in dropouts:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(dropouts, modes, strict=True):
            m.train(mode)


class PolicyRunner:
    """The policy with what sampling and scoring need besides its weights.

    Args:
        model: the policy (a peft model with LoRA).
        tokenizer: its tokenizer (decoding, padding).
        reference: the frozen initial policy without LoRA when a KL term is used; None with
            LoRA (the reference is the base with adapters off) or without a KL term.
        shared_prefix: prefill each prompt once per group (the naive baseline otherwise).
        rollout_chunk: prompts sampled or re-scored at once (None: the whole batch).
        base_dtype: the dtype the base weights were loaded in (default: the reference's).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        reference: Any | None,
        *,
        shared_prefix: bool = True,
        rollout_chunk: int | None = None,
        base_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        if base_dtype is None and reference is not None:
            base_dtype = next(reference.parameters()).dtype
        self.base_dtype = base_dtype or torch.float32
        self.shared_prefix = shared_prefix
        rollout_chunks(1, rollout_chunk)  # checks the setting now, not at the first step
        self.rollout_chunk = rollout_chunk
        self.decode_ids = DecodeIds.of(tokenizer, model)

    @classmethod
    def load(
        cls,
        settings: PolicySettings,
        path: str,
        *,
        kl_coef: float,
        shared_prefix: bool = True,
        rollout_chunk: int | None = None,
    ) -> PolicyRunner:
        """Load the policy from `path` with `settings`; a frozen reference copy, in the base's
        dtype `settings.dtype`, is made only when it is needed (no LoRA and `kl_coef` > 0)."""
        from transformers import AutoTokenizer

        # The reference is copied before the trained weights are cast to `trainable_dtype`: it
        # stays in the base's dtype, and a float32 copy of a bf16 model never exists twice.
        model = replace(settings, trainable_dtype=None).load(path)
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=settings.trust_remote_code
        )
        reference = None
        if settings.lora is None and kl_coef > 0:
            reference = copy.deepcopy(model).eval()
            reference.requires_grad_(False)
        if settings.trainable_dtype is not None:
            cast_trainable(model, DTYPES[settings.trainable_dtype])
        return cls(
            model,
            tokenizer,
            reference,
            shared_prefix=shared_prefix,
            rollout_chunk=rollout_chunk,
            base_dtype=DTYPES[settings.dtype],
        )

    def place_reference(self) -> None:
        """Give the frozen reference copy the device and dtype of the policy's frozen weights
        (call after the trainer has moved and cast the policy). A sharded reference is left as
        `fsdp.shard_models` placed it: in the compute dtype, on its ranks."""
        if self.reference is not None and not is_sharded(self.reference):
            self.reference = place_reference(self.reference, self.model, self.base_dtype)

    def sample(
        self,
        batch: PromptBatch,
        group_size: int,
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
        keep_logprobs: bool = False,
    ) -> Rollout:
        """`group_size` completions per prompt from the current policy, in eval mode.

        Sharded (FSDP2) weights are gathered once for the whole decode, and every rank decodes
        until all ranks' rows have ended (`sample_groups(sync_ranks=True)`). `keep_logprobs`:
        keep the sampler's own log-probs (`Rollout.sampler_logp`).
        """
        sharded = is_sharded(self.model)
        with eval_mode(self.model), gathered_weights(self.model):
            return sample_groups(
                self.model,
                batch,
                group_size=group_size,
                settings=settings,
                tokenizer=self.tokenizer,
                **self.decode_ids.sampling_kwargs(),
                shared_prefix=self.shared_prefix,
                chunk_size=self.rollout_chunk,
                generator=generator,
                sync_ranks=sharded,
                keep_logprobs=keep_logprobs,
            )

    def logprobs(
        self,
        model: Any,
        batch: PromptBatch,
        ids: Tensor,
        mask: Tensor,
        temperature: float,
        *,
        recompute_head: bool = False,
    ) -> Tensor:
        """(N, T) log-probs of completions `ids` under `model` (grad flows if enabled), with
        dropout off; `recompute_head`: LM-head logits recomputed in backward, not kept."""
        return self._scores(
            completion_logprobs, model, batch, ids, mask, temperature, recompute_head=recompute_head
        )

    def logprobs_and_entropy(
        self,
        model: Any,
        batch: PromptBatch,
        ids: Tensor,
        mask: Tensor,
        temperature: float,
        entropy_grad: bool = False,
        *,
        recompute_head: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """`logprobs` and the token entropy at the same positions, (N, T) each; the entropy
        carries a gradient with `entropy_grad`."""
        scorer = completion_logprobs_and_entropy
        options = {"recompute_head": recompute_head, "entropy_grad": entropy_grad}
        return self._scores(scorer, model, batch, ids, mask, temperature, **options)

    def _scores(
        self,
        scorer: Any,
        model: Any,
        batch: PromptBatch,
        ids: Tensor,
        mask: Tensor,
        temperature: float,
        **options: Any,
    ) -> Any:
        """`scorer` (a `rollout.logprobs` function) on `model` with dropout off."""
        group_size = ids.shape[0] // len(batch)
        with dropout_off(model):
            return scorer(
                model,
                batch,
                ids,
                mask,
                group_size=group_size,
                temperature=temperature,
                shared_prefix=self.shared_prefix,
                **options,
            )

    @torch.no_grad()
    def frozen_logprobs(
        self,
        batch: PromptBatch,
        rollout: Rollout,
        *,
        reference: bool,
        temperature: float,
        skip: Sequence[int] = (),
    ) -> Tensor:
        """(N, T) log-probs under the current policy (old) or the reference, in eval mode, a
        chunk of `rollout_chunk` prompts at a time; the rows of prompts in `skip` stay 0."""
        ids, mask = rollout.completion_ids, rollout.completion_mask
        model = self.reference if reference and self.reference is not None else self.model
        chunks = rollout_chunks(len(batch), self.rollout_chunk)

        def score(sub: PromptBatch, sub_ids: Tensor, sub_mask: Tensor) -> Tensor:
            return self.logprobs(model, sub, sub_ids, sub_mask, temperature)

        adapters_off = reference and self.reference is None
        with (
            eval_mode(self.model),
            self.model.disable_adapter() if adapters_off else contextlib.nullcontext(),
        ):
            return chunked_scores(score, batch, ids, mask, chunks, skip)
