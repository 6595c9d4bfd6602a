"""`PolicyRunner`: the loaded policy, its frozen reference and token ids, and the three things a
GRPO step asks of them: sample groups, score completions with grad, score them without.

Sampling and the old/reference log-prob passes run in eval mode (no dropout) and restore the
mode they found; the training pass runs in whatever mode the caller left (train).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from safegrpo_pl.inputs import PromptBatch
from safegrpo_pl.logprobs import completion_logprobs
from safegrpo_pl.model import PolicySettings, eos_token_ids, vision_token_ids
from safegrpo_pl.sampling import Rollout, SamplingSettings, sample_groups
from safegrpo_pl.sharding import gathered_weights, is_sharded


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class PolicyRunner:
    """The policy with what sampling and scoring need besides its weights.

    Args:
        model: the policy (a peft model with LoRA).
        tokenizer: its tokenizer (decoding, padding).
        reference: the frozen initial policy without LoRA when a KL term is used; None with
            LoRA (the reference is the base with adapters off) or without a KL term.
        shared_prefix: prefill each prompt once per group (the naive baseline otherwise).
    """

    def __init__(
        self, model: Any, tokenizer: Any, reference: Any | None, *, shared_prefix: bool = True
    ) -> None:
        self.model, self.tokenizer, self.reference = model, tokenizer, reference
        self.shared_prefix = shared_prefix
        self.eos_ids = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])
        self.suppress_ids = vision_token_ids(tokenizer)

    @classmethod
    def load(
        cls, settings: PolicySettings, path: str, *, kl_coef: float, shared_prefix: bool = True
    ) -> PolicyRunner:
        """Load the policy from `path` with `settings`; a frozen reference copy is made only
        when it is needed (no LoRA and `kl_coef` > 0)."""
        from transformers import AutoTokenizer

        model = settings.load(path)
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=settings.trust_remote_code
        )
        reference = None
        if settings.lora is None and kl_coef > 0:
            reference = copy.deepcopy(model).eval()
            reference.requires_grad_(False)
        return cls(model, tokenizer, reference, shared_prefix=shared_prefix)

    def sample(
        self,
        batch: PromptBatch,
        group_size: int,
        settings: SamplingSettings,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """`group_size` completions per prompt from the current policy, in eval mode.

        Sharded (FSDP2) weights are gathered once for the whole decode, and every rank decodes
        until all ranks' rows have ended (`sample_groups(sync_ranks=True)`).
        """
        sharded = is_sharded(self.model)
        with _eval_mode(self.model), gathered_weights(self.model):
            return sample_groups(
                self.model,
                batch,
                group_size=group_size,
                settings=settings,
                tokenizer=self.tokenizer,
                eos_token_ids=self.eos_ids,
                pad_token_id=self.pad_id,
                suppress_token_ids=self.suppress_ids,
                shared_prefix=self.shared_prefix,
                generator=generator,
                sync_ranks=sharded,
            )

    def logprobs(
        self, model: Any, batch: PromptBatch, ids: Tensor, mask: Tensor, temperature: float
    ) -> Tensor:
        """(N, T) log-probs of completions `ids` under `model` (grad flows if enabled)."""
        group_size = ids.shape[0] // len(batch)
        return completion_logprobs(
            model,
            batch,
            ids,
            mask,
            group_size=group_size,
            temperature=temperature,
            shared_prefix=self.shared_prefix,
        )

    @torch.no_grad()
    def frozen_logprobs(
        self, batch: PromptBatch, rollout: Rollout, *, reference: bool, temperature: float
    ) -> Tensor:
        """(N, T) log-probs under the current policy (old) or the reference, in eval mode."""
        ids, mask = rollout.completion_ids, rollout.completion_mask
        with _eval_mode(self.model):
            if not reference:
                return self.logprobs(self.model, batch, ids, mask, temperature)
            if self.reference is not None:
                return self.logprobs(self.reference, batch, ids, mask, temperature)
            with self.model.disable_adapter():
                return self.logprobs(self.model, batch, ids, mask, temperature)
