"""The model side of an evaluation: load the base and tuned models, answer greedily in batches.

This is the only module of `safegrpo_pl.eval` that imports the training package's model-side
pieces (loading, prompt encoding, sampling), so a move of those is one edit here.

Base and tuned in one run, either way:
- `adapter` set: the base checkpoint is loaded once with the LoRA adapter on top; the base
  model answers with the adapter disabled, the tuned one with it enabled;
- `tuned_path` set: two checkpoints, loaded one after the other (never both in memory);
- neither: the base model alone.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from safegrpo_pl.eval.records import EvalRecord
from safegrpo_pl.policy.inputs import PromptEncoder
from safegrpo_pl.policy.model import DecodeIds, load_policy
from safegrpo_pl.rollout.sampling import SamplingSettings, sample_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """Which models to evaluate and how to prompt them.

    Attributes:
        path: the base checkpoint (hub id, folder, or `tiny:ARCH`).
        adapter: a LoRA adapter folder (as training saves it): tuned = base + adapter.
        tuned_path: a second full checkpoint as the tuned model (instead of `adapter`).
        dtype: weight dtype ("float32", "bfloat16", "float16").
        attn_implementation: e.g. "sdpa" or "flash_attention_2"; None lets transformers pick.
        trust_remote_code: run code shipped with the checkpoint; off unless you opt in.
        guide: the safety guide added to every prompt: "default" (the one training used),
            None for none. Use what the tuned model was trained with, for both models.
        system_prompt: an optional system message.
    """

    path: str = "tiny:qwen2_5_vl"
    adapter: str | None = None
    tuned_path: str | None = None
    dtype: str = "float32"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    guide: str | None = "default"
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.adapter and self.tuned_path:
            raise ValueError(
                "model.adapter and model.tuned_path are both set; give one: the adapter (tuned "
                "= base + LoRA) or a second checkpoint"
            )

    def identity(self, role: str, generation: GenerationSettings) -> str:
        """What made `role`'s answers (checkpoint, adapter, prompt, length): a resumed run
        reuses an answer only when this is unchanged."""
        if role == "base":
            source = self.path + (" (adapter off)" if self.adapter else "")
        else:
            source = f"{self.path} + {self.adapter}" if self.adapter else str(self.tuned_path)
        return (
            f"{source}; guide={self.guide!r}; system_prompt={self.system_prompt!r}; "
            f"max_new_tokens={generation.max_new_tokens}"
        )

    @property
    def roles(self) -> tuple[str, ...]:
        """`("base", "tuned")`, or `("base",)` when there is no tuned model."""
        return ("base", "tuned") if (self.adapter or self.tuned_path) else ("base",)


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (greedy, one per prompt).

    Attributes:
        batch_size: prompts per generation batch.
        max_new_tokens: answer length limit (the paper's: 4096, room for the thinking).
        device: "cpu", "cuda", ...; None picks cuda when available.
    """

    batch_size: int = 8
    max_new_tokens: int = 4096
    device: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("generation.batch_size and generation.max_new_tokens must be >= 1")


OnBatch = Callable[[str, Sequence[EvalRecord], list[str], list[bool]], None]
"""(role, records, answers, cut): `cut[i]` is True when answer i hit max_new_tokens unfinished."""


class _Policy:
    """A loaded model with what decoding it needs."""

    def __init__(self, path: str, settings: ModelSettings, device: str, adapter: str | None):
        self.encoder = PromptEncoder.from_pretrained(
            path,
            guide=settings.guide,
            system_prompt=settings.system_prompt,
            trust_remote_code=settings.trust_remote_code,
        )
        model = load_policy(
            path,
            dtype=settings.dtype,
            trust_remote_code=settings.trust_remote_code,
            attn_implementation=settings.attn_implementation,
        )
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.to(device).eval()
        self.device = device
        self.decode_ids = DecodeIds.of(self.encoder.tokenizer, model)

    def answer(
        self, records: Sequence[EvalRecord], max_new_tokens: int
    ) -> tuple[list[str], list[bool]]:
        """The answers, and whether each was cut at `max_new_tokens` before it ended."""
        batch = self.encoder.encode([r.to_safety_record() for r in records]).to(self.device)
        rollout = sample_groups(
            self.model,
            batch,
            group_size=1,
            settings=SamplingSettings(do_sample=False, max_new_tokens=max_new_tokens),
            tokenizer=self.encoder.tokenizer,
            **self.decode_ids.sampling_kwargs(),
        )
        return list(rollout.texts), [bool(t) for t in rollout.truncated.tolist()]

    def mode(self, role: str) -> contextlib.AbstractContextManager:
        """Adapters off for the base role when the tuned model is an adapter."""
        if role == "base" and hasattr(self.model, "disable_adapter"):
            return self.model.disable_adapter()
        return contextlib.nullcontext()


def _policies(
    settings: ModelSettings, device: str, roles: Sequence[str]
) -> Iterator[tuple[str, _Policy]]:
    """(role, model) for each role to run, loading as few checkpoints as the settings allow."""
    if settings.adapter:
        policy = _Policy(settings.path, settings, device, settings.adapter)
        for role in roles:
            yield role, policy
        return
    paths = {"base": settings.path, "tuned": settings.tuned_path}
    for role in roles:
        policy = _Policy(paths[role], settings, device, None)
        yield role, policy
        del policy
        gc.collect()


def generate(
    settings: ModelSettings,
    generation: GenerationSettings,
    todo: dict[str, list[EvalRecord]],
    on_batch: OnBatch,
) -> None:
    """Answer `todo[role]` with each role's model, batch by batch; `on_batch(role, records,
    texts, cut)` receives every batch as soon as it is done (so an interrupted run keeps them)."""
    roles = [role for role in settings.roles if todo.get(role)]
    if not roles:
        return
    device = generation.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for role, policy in _policies(settings, device, roles):
        records = todo[role]
        step = generation.batch_size
        with policy.mode(role), torch.inference_mode():
            for start in tqdm(
                range(0, len(records), step), desc=f"generate ({role})", unit="batch"
            ):
                chunk = records[start : start + step]
                on_batch(role, chunk, *policy.answer(chunk, generation.max_new_tokens))
        log.info("generated %d answers with the %s model", len(records), role)


def visible_answer(text: str) -> str:
    """What the user reads: the first answer block, else the text after the last `</think>`,
    else everything (the same reading the reward's `refused` flag uses)."""
    from safegrpo_pl.core.completion_parser import parse_completion

    answer = parse_completion(text).answer
    if answer is not None:
        return answer.strip()
    think = text.lower().rfind("</think>")
    return (text[think + len("</think>") :] if think != -1 else text).strip()
