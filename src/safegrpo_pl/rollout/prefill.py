"""Model plumbing shared by sampling and scoring: positions, the prompt prefill, the full forward.

Positions are computed here and passed explicitly (Qwen-VL: 3-D rotary positions from the
model's `get_rope_index` for the prompt, then last position + 1 + step for every generated
token), so nothing depends on the `rope_deltas` a Qwen-VL model caches between calls. The model
body is run without its LM head: callers apply the head only where they need logits.

Caveats:
- Logits are taken as `lm_head(last_hidden_state)`, as in the Qwen families; a model whose
  causal-LM head does more (soft-capping, logit scaling) would need its own hook in
  `safegrpo_pl.rollout.sampling` and `safegrpo_pl.rollout.logprobs`.
- HF layers discard the KV cache when gradient checkpointing runs in train mode: sampling runs
  in eval mode, and scoring records the prompt's keys/values instead of caching them
  (`safegrpo_pl.rollout.prefix_attention`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.policy.model import model_family


def unwrap_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_body(base: Any) -> Any:
    """The model without its LM head (`Qwen2_5_VLModel`, `Qwen3VLModel`, `Qwen3Model`, ...)."""
    return getattr(base, base.base_model_prefix)


@functools.lru_cache(maxsize=64)
def _cache_keyword(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(body: Any, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to `body`'s forward: `cache` where transformers
    renamed it (5.24 and later, which warn on the old name), `past_key_values` before."""
    return {_cache_keyword(type(body)): cache}


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Put `model` in eval mode for a block, then restore its train/eval state."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def check_group_size(group_size: int) -> None:
    """Raise if `group_size` (G) is not a positive count."""
    if group_size < 1:
        raise ValueError(f"group_size is {group_size}; expected >= 1")


def prompt_positions(base: Any, batch: PromptBatch) -> tuple[Tensor, Tensor]:
    """Rotary positions of the left-padded prompt and each prompt's next free position.

    Returns:
        positions: (3, B, L) for Qwen-VL (temporal/height/width rows; text tokens have three equal
            rows), (B, L) for a text-only model; 0 on padding.
        next_position: (B,) position of the first completion token.
    """
    mask = batch.attention_mask
    text = (mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, L)
    if model_family(base.config) == "text":
        return text, text.amax(-1) + 1
    kwargs = batch.model_kwargs
    grid = kwargs.get("image_grid_thw")
    if grid is None:
        positions = text.unsqueeze(0).expand(3, -1, -1)  # (3, B, L)
    else:
        token_types = kwargs.get("mm_token_type_ids")
        if token_types is None:
            token_types = (batch.input_ids == base.config.image_token_id).int()
        positions, _ = model_body(base).get_rope_index(
            batch.input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid,
            attention_mask=mask,
        )
    return positions, positions.amax(dim=(0, 2)) + 1


def step_positions(first: Tensor, steps: int, prompt_positions: Tensor) -> Tensor:
    """Positions of `steps` consecutive tokens from `first` (N,), shaped like the prompt's.

    Returns:
        (3, N, S) when `prompt_positions` are 3-D rotary (Qwen-VL), else (N, S).
    """
    positions = first.unsqueeze(-1) + torch.arange(steps, device=first.device)  # (N, S)
    if prompt_positions.ndim == 2:
        return positions
    return positions.unsqueeze(0).expand(prompt_positions.shape[0], -1, -1)


def prefill_prompts(
    base: Any, batch: PromptBatch, positions: Tensor
) -> tuple[Tensor, DynamicCache]:
    """Run the prompt (images included) once; returns its last hidden state (B, H) and cache."""
    cache = DynamicCache(config=base.config)
    body = model_body(base)
    out = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        **cache_kwargs(body, cache),
        use_cache=True,
        **batch.model_kwargs,
    )
    return out.last_hidden_state[:, -1], cache  # left padding: column L-1 is real


def full_sequence_hidden(
    base: Any,
    batch: PromptBatch,
    completion_ids: Tensor,
    group_size: int,
    image_inputs: dict[str, Any],
) -> Tensor:
    """Hidden states that predict each completion token from one forward over prompt+completion.

    Args:
        image_inputs: how the N rows see their images (the caller's choice: repeated encoder
            outputs or repeated pixels), with `image_grid_thw` repeated per completion; empty
            for text-only prompts.

    Returns:
        (N, T, H).
    """
    steps = completion_ids.shape[1]
    prompt_len = batch.input_ids.shape[1]
    positions, next_position = prompt_positions(base, batch)
    prompt = positions.repeat_interleave(group_size, dim=-2)  # (.., N, L)
    tail = step_positions(next_position.repeat_interleave(group_size), steps, positions)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, 0)  # (N, L)
    kwargs = dict(image_inputs)
    if "mm_token_type_ids" in batch.model_kwargs:
        types = batch.model_kwargs["mm_token_type_ids"].repeat_interleave(group_size, 0)
        kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], steps)], 1)
    out = model_body(base)(
        input_ids=torch.cat([batch.input_ids.repeat_interleave(group_size, 0), completion_ids], 1),
        attention_mask=torch.cat(
            [prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], steps)], 1
        ),
        position_ids=torch.cat([prompt, tail], -1),
        use_cache=False,
        **kwargs,
    )
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + steps]  # (N, T, H)


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
