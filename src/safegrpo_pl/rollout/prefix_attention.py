"""Shared-prefix attention: decode G completions of one prompt without G copies of its cache.

Why this module exists: GRPO samples G completions of every prompt. A stock KV cache holds G
copies of each prompt's keys/values (repeated after the prefill), and every decode step reads all
G copies, although they are identical: with a long guided prompt plus image tokens and short
completions, that is most of the memory traffic of sampling. Here the prompt's keys/values stay
at B rows, as the prefill left them, and the G rows of a group read their prompt's keys/values
ONCE per step, as one matrix product over the whole group; only the generated tokens'
keys/values are per row, kept in a buffer that grows with the tokens actually generated.

The pieces:
- `GroupDecodeCache`: a transformers `Cache` holding, per layer, the prompt part (B rows) and a
  buffer for the generated part (N = B * G rows). The buffer starts at `INITIAL_CAPACITY`
  tokens and doubles when full, up to the length limit: it never reserves `max_new_tokens` for
  rows that stop early (at 4,096 new tokens and a 144 KiB/token 8B model, the full reservation
  is 0.6 GiB per sequence), and doubling keeps the copying to at most one extra pass over the
  tokens held. With `static=True` the buffer holds the whole limit from the start, every step
  writes at a position kept in a tensor and attends to the whole buffer (slots not yet written
  masked out): every step then sees the same shapes and Python values, which a compiled step
  needs to run without recompiling (`safegrpo_pl.rollout.sampling`, `SamplingSettings.decode`).
- `shared_prefix_attention`: exact softmax attention of the N rows over [their prompt's keys,
  their own generated keys], registered with transformers' attention table under
  `SHARED_PREFIX_ATTENTION` when this module is imported.
- `attention_implementation`: routes the language model's attention layers to it for the
  duration of a block (the decode loop in `safegrpo_pl.rollout.sampling`), and back afterwards.

Deliberate departures and caveats:
- Only for decoding in eval mode (dropout 0) and for models whose decoder layers all attend to
  the whole context; `safegrpo_pl.rollout.sampling` falls back to a repeated prompt cache otherwise.
- In half precision the attention scores are rounded to the model dtype before a float32
  softmax (as HF's eager attention does), where SDPA kernels keep them in float32: sampling and
  scoring may differ in the last bits, far less than vLLM vs HF do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

SHARED_PREFIX_ATTENTION = "safegrpo_shared_prefix"
"""Name under which `shared_prefix_attention` is registered with transformers' attention table."""

INITIAL_CAPACITY = 64
"""Generated tokens the decode cache holds before its first doubling."""


class _GroupDecodeLayer(CacheLayerMixin):
    """One layer's keys/values while decoding N = B*G rows that share B prompts.

    The prompt's keys/values stay as the prefill left them, B rows; the generated tokens' go
    into a buffer of N rows that doubles when full (never past `capacity` tokens), so the
    step-to-step cost is a write, not a re-concatenation, and memory follows the tokens
    generated. `update` returns the generated part only; `shared_prefix_attention` reads the
    prompt part.
    """

    def __init__(
        self,
        prefix_keys: Tensor,
        prefix_values: Tensor,
        group_size: int,
        capacity: int,
        position: Tensor | None = None,
    ) -> None:
        super().__init__()
        rows, kv_heads, _, head_dim = prefix_keys.shape  # (B, kv_heads, L, head_dim)
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.capacity = capacity
        self.position = position  # static: (1,) long, the slot the next token is written to
        start = capacity if position is not None else min(capacity, INITIAL_CAPACITY)
        shape = (rows * group_size, kv_heads, start, head_dim)
        # Zeros, not empty: a static step multiplies the unwritten slots by probability 0, and
        # 0 * (whatever empty memory held: inf, NaN) would not be 0.
        self.suffix_keys = prefix_keys.new_zeros(shape)  # (N, kv_heads, held, head_dim)
        self.suffix_values = prefix_values.new_zeros(shape[:-1] + prefix_values.shape[-1:])
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Nothing to do: the buffers exist from construction."""

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.position is not None:  # static: no Python value changes here (`advance` does)
            if key_states.shape[-2] != 1:
                raise ValueError(
                    f"a static decode cache takes one token per step; got {key_states.shape[-2]}"
                )
            self.suffix_keys.index_copy_(2, self.position, key_states)
            self.suffix_values.index_copy_(2, self.position, value_states)
            return self.suffix_keys, self.suffix_values
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"decode cache holds {self.capacity} new tokens; {end} requested")
        if end > self.suffix_keys.shape[-2]:
            self._grow(end)
        self.suffix_keys[:, :, self.length : end] = key_states
        self.suffix_values[:, :, self.length : end] = value_states
        self.length = end
        return self.suffix_keys[:, :, :end], self.suffix_values[:, :, :end]

    def _grow(self, needed: int) -> None:
        """Double the generated-token buffers (at least to `needed`, at most to `capacity`)."""
        held = self.suffix_keys.shape[-2]
        size = min(self.capacity, max(needed, 2 * held))
        for name in ("suffix_keys", "suffix_values"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], size, *old.shape[3:]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def held_bytes(self) -> int:
        """Bytes of the generated-token buffers (the prompt part is the prefill's)."""
        return sum(t.numel() * t.element_size() for t in (self.suffix_keys, self.suffix_values))

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.prefix_keys.shape[-2] + self.capacity


class GroupDecodeCache(Cache):
    """KV cache for decoding G completions per prompt without copying the prompt's cache G times.

    Args:
        prompt_cache: the prefill's cache, B rows.
        prompt_mask: (B, L) the prompts' attention mask (left padding is 0).
        group_size: G.
        capacity: the most tokens that will be fed after the prompt.
        static: hold `capacity` tokens from the start and take one token per step, written at
            `position` (see the module doc); the caller calls `advance` after each step.
    """

    def __init__(
        self,
        prompt_cache: DynamicCache,
        prompt_mask: Tensor,
        group_size: int,
        capacity: int,
        *,
        static: bool = False,
    ) -> None:
        device = prompt_mask.device
        self.position = torch.zeros(1, dtype=torch.long, device=device) if static else None
        layers = [
            _GroupDecodeLayer(layer.keys, layer.values, group_size, capacity, self.position)
            for layer in prompt_cache.layers
        ]
        super().__init__(layers=layers)
        padding = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=device)
        # (B, 1, 1, L): 0 on prompt tokens, -inf on left padding; added to the prompt scores
        self.prompt_bias = padding.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
        self.group_size = group_size

    def advance(self) -> None:
        """After a step of a static cache: the next token goes to the next slot."""
        self.position.add_(1)
        for layer in self.layers:
            layer.length += 1


def shared_prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    group_cache: GroupDecodeCache | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of N = B*G rows over their shared prompt (B rows) plus their own new tokens.

    Exact softmax attention over [prompt keys, own generated keys], computed as one softmax over
    two score blocks: the prompt block is a (G * heads_per_kv * q)-row matrix product per prompt,
    so each prompt's keys are read once for its whole group instead of G times. Queries see
    every generated key up to their own position (causal within the new tokens).

    Args:
        module: the attention module (`layer_idx`, `num_key_value_groups`, `head_dim`).
        query: (N, heads, q, head_dim).
        key, value: (N, kv_heads, s, head_dim): the generated tokens' keys/values so far (a
            static cache: all its slots, those after `group_cache.position` masked out).
        attention_mask: ignored: prompt padding comes from `group_cache.prompt_bias`.
        scaling: the softmax scale (default 1/sqrt(head_dim)).
        dropout: must be 0 (decoding runs in eval mode).
        group_cache: the `GroupDecodeCache` holding the prompt part (passed as a forward kwarg).

    Returns:
        ((N, q, heads, head_dim) attention output, None).
    """
    if group_cache is None:
        raise ValueError(f"{SHARED_PREFIX_ATTENTION} attention needs the group_cache kwarg")
    if dropout:
        raise ValueError("shared-prefix attention is for decoding in eval mode (dropout 0)")
    layer = group_cache.layers[module.layer_idx]
    prefix_keys, prefix_values = layer.prefix_keys, layer.prefix_values  # (B, kv, L, d)
    rows, heads, q_len, head_dim = query.shape
    num_prompts, kv_heads, prompt_len, _ = prefix_keys.shape
    group = rows // num_prompts
    per_kv = heads // kv_heads
    scale = scaling if scaling is not None else head_dim**-0.5
    query = query * scale  # (N, heads, q, d): scaling the few queries, not the many scores
    # (N, heads, q, d) -> (B, kv, G * per_kv * q, d): one group's queries against its prompt.
    grouped = query.reshape(num_prompts, group, kv_heads, per_kv * q_len, head_dim)
    grouped = grouped.transpose(1, 2).reshape(num_prompts, kv_heads, -1, head_dim)
    # Scores come out in the model dtype, as in HF's eager attention; the float32 padding bias
    # promotes them to float32 for the softmax in the same pass.
    prompt_scores = torch.matmul(grouped, prefix_keys.transpose(-1, -2)) + group_cache.prompt_bias
    prompt_scores = prompt_scores.reshape(num_prompts, kv_heads, group, -1, prompt_len)
    prompt_scores = prompt_scores.transpose(1, 2).reshape(rows, kv_heads, -1, prompt_len)
    own = query.reshape(rows, kv_heads, per_kv * q_len, head_dim)  # (N, kv, per_kv*q, d)
    new_scores = torch.matmul(own, key.transpose(-1, -2)).float()  # (N, kv, per_kv * q, s)
    if group_cache.position is not None:  # static: slots after this token's are not written yet
        slots = torch.arange(key.shape[-2], device=query.device)
        new_scores = new_scores.masked_fill(slots > group_cache.position, float("-inf"))
    elif q_len > 1:  # query i (of q) sits at generated index s - q + i
        seen = key.shape[-2]
        allowed = (
            torch.arange(seen, device=query.device)[None, :]
            <= torch.arange(seen - q_len, seen, device=query.device)[:, None]
        )  # (q, s)
        new_scores = new_scores.masked_fill(~allowed.repeat(per_kv, 1), float("-inf"))
    probs = torch.cat([prompt_scores, new_scores], -1).softmax(-1).to(value.dtype)
    prompt_probs = probs[..., :prompt_len].reshape(num_prompts, group, kv_heads, -1, prompt_len)
    prompt_probs = prompt_probs.transpose(1, 2).reshape(num_prompts, kv_heads, -1, prompt_len)
    out = torch.matmul(prompt_probs, prefix_values)  # (B, kv, G*per_kv*q, d)
    out = out.reshape(num_prompts, kv_heads, group, -1, head_dim).transpose(1, 2)
    out = out.reshape(rows, kv_heads, -1, head_dim) + torch.matmul(probs[..., prompt_len:], value)
    out = out.reshape(rows, heads, q_len, head_dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


@contextlib.contextmanager
def attention_implementation(base: Any, name: str) -> Iterator[None]:
    """Route the language model's attention layers to `name` for the duration of the block.

    Only the decoder's config is touched (not the vision tower's), and it is restored even on
    error. An implementation unknown to the mask table also makes transformers skip building a
    causal mask, which `shared_prefix_attention` does not need.
    """
    config = base.get_decoder().config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = previous
