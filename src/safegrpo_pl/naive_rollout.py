"""The naive baseline the shared-prefix hot path is measured and checked against.

Only the benchmark (`scripts/bench.py`, rollout vs naive) and the equivalence tests use it,
through `shared_prefix=False` of `sample_groups` / `completion_logprobs` (and of
`SafeGRPOModule`): each of those picks its function once, so the hot path holds no branch for it.

- Sampling: `model.generate` with `num_return_sequences=G`, the prompt and image re-processed
  for every completion's cache.
- Log-probs: one full forward over prompt + completion per completion, with `pixel_values`
  repeated per completion (the image re-encoded G times, as TRL does).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from safegrpo_pl.inputs import PromptBatch
from safegrpo_pl.prefill import eval_mode, full_sequence_hidden

if TYPE_CHECKING:
    from safegrpo_pl.sampling import DecodeSpec


def generate_completions(
    model: Any, batch: PromptBatch, spec: DecodeSpec, generator: torch.Generator | None
) -> Tensor:
    """`generate` with `num_return_sequences=G` in eval mode; returns (N, T) ids.

    Greedy decoding gives G equal rows, and `generate` refuses `num_return_sequences > 1`
    without sampling: it decodes once per prompt and repeats the rows. `generate` takes no
    generator, so `generator` seeds a forked global RNG instead.
    """
    settings = spec.settings
    copies = spec.group_size if settings.do_sample else 1
    options: dict[str, Any] = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        num_return_sequences=copies,
        eos_token_id=list(spec.eos_token_ids),
        pad_token_id=spec.pad_token_id,
        suppress_tokens=list(spec.suppress_token_ids) or None,
        repetition_penalty=1.0,  # override a checkpoint's own generation_config
    )
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    device = batch.input_ids.device
    rng = contextlib.nullcontext()
    if generator is not None:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, torch.no_grad(), eval_mode(model):
        if generator is not None:
            torch.manual_seed(seed)
        sequences = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            **batch.model_kwargs,
            **options,
            synced_gpus=spec.sync_ranks,
        )
    completions = sequences[:, batch.input_ids.shape[1] :]  # (B * copies, T)
    return completions.repeat_interleave(spec.group_size // copies, 0)


def repeated_pixels_hidden(
    base: Any, batch: PromptBatch, completion_ids: Tensor, group_size: int
) -> Tensor:
    """Hidden states (N, T, H) from a full forward per completion, its image's pixels repeated.

    The vision tower runs once per completion, not once per prompt.
    """
    vision = batch.model_kwargs
    image_inputs: dict[str, Any] = {}
    if "pixel_values" in vision:
        grid = vision["image_grid_thw"]
        patches = grid.prod(-1).tolist()  # patches per image, back to back in pixel_values
        per_image = torch.split(vision["pixel_values"], patches)
        image_inputs["image_grid_thw"] = grid.repeat_interleave(group_size, 0)
        image_inputs["pixel_values"] = torch.cat([p for p in per_image for _ in range(group_size)])
    return full_sequence_hidden(base, batch, completion_ids, group_size, image_inputs)
