"""Shared-prefix attention: G completions of one prompt over ONE copy of its keys/values.

Why this module exists: GRPO samples and scores G completions of every prompt. A stock KV cache
holds G copies of each prompt's keys/values (repeated after the prefill), and every attention
call reads all G copies, although they are identical: with a long guided prompt plus image
tokens, that is most of the memory of sampling and scoring. Here the prompt's keys/values stay
at B rows, as the prefill left them, and the G rows of a group read their prompt's keys/values
ONCE, as one matrix product over the whole group; only the completion tokens' keys/values are
per row.

The pieces:
- `SharedPrompt`: each layer's prompt keys/values (B rows) and the prompts' padding.
- `GroupDecodeCache`: a transformers `Cache` for decoding: the shared prompt plus a buffer for
  the generated part (N = B * G rows). The buffer starts at `INITIAL_CAPACITY` tokens and
  doubles when full, up to the length limit: it never reserves `max_new_tokens` for rows that
  stop early (at 4,096 new tokens and a 144 KiB/token 8B model, the full reservation is 0.6 GiB
  per sequence), and doubling keeps the copying to at most one extra pass over the tokens held.
  With `static=True` the buffer holds the whole limit from the start, every step writes at a
  slot kept in a tensor and attends to the whole buffer (slots not yet written masked out):
  every step then sees the same shapes and Python values, which a compiled step needs to run
  without recompiling (`safegrpo_pl.rollout.sampling`, `SamplingSettings.decode`).
- `shared_prefix_attention`: exact softmax attention of the N rows over [their prompt's keys,
  their own keys], registered with transformers' attention table under
  `SHARED_PREFIX_ATTENTION` when this module is imported. Differentiable (the training
  forward), with the prompt's gradient summed over its group. On CPU, a scoring forward runs
  on torch's fused attention kernel (the one SDPA runs, called directly for its log-sum-exp):
  one call for the prompt block, its queries laid out per prompt, one causal call for the own
  block, merged by their log-sum-exps; the kernel's backward is given the merged output and
  log-sum-exp, so each block's gradient is its share of the one softmax's. Elsewhere (decode
  steps, GPUs) plain PyTorch, tile by tile: the backward recomputes the scores from the saved
  log-sum-exp, as flash attention does. Neither keeps a (query, key) matrix beyond a tile of
  `ATTENTION_TILE_ELEMENTS`.
- `route_shared_prompt`: routes the language model's attention through a dispatcher chosen by
  forward kwargs: the model's own attention, which with `record_prompt` also writes each
  layer's prompt keys/values into a `SharedPrompt` (unlike a KV cache, this survives gradient
  checkpointing, where HF drops the cache; a recomputed layer writes equal values), or
  `shared_prefix_attention` with `shared_prompt` (scoring).
- `attention_implementation`: routes the language model's attention layers to a named
  implementation for the duration of a block, and back afterwards (the decode loop).

Deliberate departures and caveats:
- Only with dropout 0 (GRPO switches dropout off everywhere) and for models whose decoder
  layers all attend to the whole context (`only_full_attention`); sampling and scoring fall
  back to a repeated prompt otherwise.
- In half precision the plain-PyTorch path rounds the attention scores to the model dtype
  before a float32 softmax (as HF's eager attention does), where SDPA kernels, the fused CPU
  path included, keep them in float32: sampling and scoring may differ in the last bits, far
  less than vLLM vs HF do.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SHARED_PREFIX_ATTENTION = "safegrpo_shared_prefix"
"""Name under which `shared_prefix_attention` is registered with transformers' attention table."""

SHARED_PROMPT_DISPATCH = "safegrpo_dispatch"
"""Prefix of the names under which `route_shared_prompt` registers its dispatchers."""

INITIAL_CAPACITY = 64
"""Generated tokens the decode cache holds before its first doubling."""

ATTENTION_TILE_ELEMENTS = 2**26
"""Upper bound on the float32 (query, key) scores of one tile of queries: 256 MiB."""


FUSED_CPU_KERNEL = True
"""Whether a scoring forward on CPU runs on SDPA's fused CPU kernel; False: on the plain-PyTorch
tiles that GPUs run (`scripts/plan_check.py` measures those: `plan` estimates a GPU's memory)."""

_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
"""SDPA's fused CPU kernel, called directly because it also returns the log-sum-exp."""

_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class SharedPrompt:
    """Each layer's prompt keys/values, B rows, shared by the G completions of each prompt
    (G is read off the attention's N = B * G rows).

    A plain class, not a dataclass: FSDP2 rebuilds dataclass (and dict) forward kwargs to cast
    their tensors, so `record` would write into a copy that the scoring forward never sees.

    Attributes:
        keys, values: per layer, (B, kv_heads, L, head_dim), filled by the prefill.
        bias: (B, 1, 1, L) float32, 0 on prompt tokens and -inf on left padding.
    """

    def __init__(self, bias: Tensor) -> None:
        self.bias = bias
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    @classmethod
    def for_prompts(cls, prompt_mask: Tensor) -> SharedPrompt:
        """An empty shared prompt for (B, L) `prompt_mask` (left padding is 0)."""
        zeros = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
        bias = zeros.masked_fill(prompt_mask == 0, float("-inf"))[:, None, None, :]
        return cls(bias=bias)

    @classmethod
    def from_cache(cls, cache: DynamicCache, prompt_mask: Tensor) -> SharedPrompt:
        """The shared prompt of a prefill's cache (B rows)."""
        prompt = cls.for_prompts(prompt_mask)
        for index, layer in enumerate(cache.layers):
            prompt.record(index, layer.keys, layer.values)
        return prompt

    def record(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """Keep `layer`'s prompt keys/values (B, kv_heads, L, head_dim)."""
        self.keys[layer], self.values[layer] = keys, values


class _GroupDecodeLayer(CacheLayerMixin):
    """One layer's generated keys/values while decoding N = B*G rows that share B prompts.

    The generated tokens' keys/values go into a buffer of N rows that doubles when full (never
    past `capacity` tokens), so the step-to-step cost is a write, not a re-concatenation, and
    memory follows the tokens generated. `update` returns the generated part only;
    `shared_prefix_attention` reads the prompt part from the `SharedPrompt`.
    """

    def __init__(
        self,
        prefix_keys: Tensor,
        prefix_values: Tensor,
        rows: int,
        capacity: int,
        position: Tensor | None = None,
    ) -> None:
        super().__init__()
        _, kv_heads, self.prompt_length, head_dim = prefix_keys.shape  # (B, kv, L, head_dim)
        self.capacity = capacity
        self.position = position  # static: (1,) long, the slot the next token is written to
        start = capacity if position is not None else min(capacity, INITIAL_CAPACITY)
        shape = (rows, kv_heads, start, head_dim)
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
        return self.prompt_length + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.prompt_length + self.capacity


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
        self.prompt = SharedPrompt.from_cache(prompt_cache, prompt_mask)
        rows = prompt_mask.shape[0] * group_size
        self.position = (
            torch.zeros(1, dtype=torch.long, device=prompt_mask.device) if static else None
        )
        layers = [
            _GroupDecodeLayer(layer.keys, layer.values, rows, capacity, self.position)
            for layer in prompt_cache.layers
        ]
        super().__init__(layers=layers)

    def advance(self) -> None:
        """After a step of a static cache: the next token goes to the next slot."""
        self.position.add_(1)
        for layer in self.layers:
            layer.length += 1


def _to_groups(x: Tensor, prompts: int) -> Tensor:
    """(N, kv, X, d) rows -> (B, kv, G * X, d): a group's rows side by side per prompt."""
    rows, kv, width = x.shape[:3]
    group = rows // prompts
    x = x.reshape(prompts, group, kv, width, x.shape[-1]).transpose(1, 2)
    return x.reshape(prompts, kv, group * width, x.shape[-1])


def _to_rows(x: Tensor, rows: int) -> Tensor:
    """(B, kv, G * X, d) -> (N, kv, X, d), the inverse of `_to_groups`."""
    prompts, kv, width = x.shape[:3]
    group = rows // prompts
    x = x.reshape(prompts, kv, group, width // group, x.shape[-1]).transpose(1, 2)
    return x.reshape(rows, kv, width // group, x.shape[-1])


def _grouped(x: Tensor, prompts: int, kv_heads: int) -> Tensor:
    """(N, heads, q, X) -> (B, kv, G * per_kv * q, X): a group's queries side by side, per kv
    head, as one batch row per prompt (the layout that reads its keys once)."""
    rows, heads, q_len, width = x.shape
    return _to_groups(x.reshape(rows, kv_heads, heads // kv_heads * q_len, width), prompts)


def _ungrouped(x: Tensor, rows: int, heads: int) -> Tensor:
    """(B, kv, G * per_kv * q, X) -> (N, heads, q, X), the inverse of `_grouped`."""
    out = _to_rows(x, rows)  # (N, kv, per_kv * q, X)
    return out.reshape(rows, heads, -1, x.shape[-1])


def _uses_fused_kernel(query: Tensor, keys: Tensor) -> bool:
    """Whether `_fused_attend` applies: CPU tensors, and a scoring forward (several queries and
    as many own keys, so the own block is plainly causal). Never a one-token decode step: the
    growing and static decode caches must run the same arithmetic (equal sampled tokens)."""
    q_len = query.shape[-2]
    on_cpu = FUSED_CPU_KERNEL and query.device.type == "cpu"
    return on_cpu and q_len > 1 and keys.shape[-2] == q_len


def _fused_attend(
    query: Tensor,
    prefix_keys: Tensor,
    prefix_values: Tensor,
    bias: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """`_attend` on torch's fused CPU attention kernel (the one SDPA runs): output (N, heads,
    q, dv) and float32 log-sum-exp (N, heads, q).

    Two kernel calls, merged by their log-sum-exps: the prompt block on the grouped layout
    (B batch rows, each prompt's keys read once for its group), the own block causal over the
    rows' own keys (their GQA heads repeated: the rows' own keys only, never the prompt's).
    """
    rows, heads = query.shape[:2]
    prompts, kv_heads = prefix_keys.shape[:2]
    per_kv = heads // kv_heads
    prompt_out, prompt_lse = _FLASH_CPU(
        _grouped(query, prompts, kv_heads),
        prefix_keys,
        prefix_values,
        attn_mask=bias.to(query.dtype),
        scale=scale,
    )
    prompt_out = _ungrouped(prompt_out, rows, heads)  # (N, heads, q, dv)
    prompt_lse = _ungrouped(prompt_lse[..., None], rows, heads)[..., 0]  # (N, heads, q)
    own_keys, own_values = (t.repeat_interleave(per_kv, 1) for t in (keys, values))
    own_out, own_lse = _FLASH_CPU(query, own_keys, own_values, is_causal=True, scale=scale)
    lse = torch.logaddexp(prompt_lse, own_lse)  # (N, heads, q)
    out = prompt_out * (prompt_lse - lse).exp()[..., None]
    out = out + own_out * (own_lse - lse).exp()[..., None]
    return out.to(query.dtype), lse


def _fused_backward(
    grad_out: Tensor,
    saved: tuple[Tensor, ...],
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (query, prefix keys, prefix values, keys, values) of `_fused_attend`.

    Each block's backward kernel gets the MERGED output and log-sum-exp: its probabilities are
    then the block's share of the whole softmax and its rowsum(dO * O) the whole row's, so the
    two blocks' gradients add up to the gradient of the one softmax.
    """
    query, prefix_keys, prefix_values, bias, keys, values, out, lse = saved
    rows, heads = query.shape[:2]
    prompts, kv_heads = prefix_keys.shape[:2]
    per_kv = heads // kv_heads

    def grouped(x: Tensor) -> Tensor:
        return _grouped(x, prompts, kv_heads)

    prompt_query, grad_prefix_keys, grad_prefix_values = _FLASH_CPU_BACKWARD(
        grouped(grad_out),
        grouped(query),
        prefix_keys,
        prefix_values,
        grouped(out),
        grouped(lse[..., None])[..., 0].contiguous(),
        0.0,
        False,
        attn_mask=bias.to(query.dtype),
        scale=scale,
    )
    own_keys, own_values = (t.repeat_interleave(per_kv, 1) for t in (keys, values))
    own_query, grad_keys, grad_values = _FLASH_CPU_BACKWARD(
        grad_out, query, own_keys, own_values, out, lse, 0.0, True, scale=scale
    )
    grad_query = _ungrouped(prompt_query, rows, heads) + own_query
    grad_keys, grad_values = (
        g.reshape(rows, kv_heads, per_kv, *g.shape[2:]).sum(2) for g in (grad_keys, grad_values)
    )
    return grad_query, grad_prefix_keys, grad_prefix_values, grad_keys, grad_values


def _query_tiles(query: Tensor, context: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of query positions whose scores fit `ATTENTION_TILE_ELEMENTS`."""
    rows, heads, q_len, _ = query.shape
    size = max(1, ATTENTION_TILE_ELEMENTS // max(1, rows * heads * context))
    return [(start, min(start + size, q_len)) for start in range(0, q_len, size)]


def _tile_scores(
    tile: Tensor,
    span: tuple[int, int, int],
    prefix_keys: Tensor,
    bias: Tensor,
    keys: Tensor,
    slot: Tensor | None = None,
) -> Tensor:
    """float32 scores (N, kv, per_kv * m, L + S) of a tile of m scaled queries.

    Args:
        tile: (N, kv, per_kv * m, d) scaled queries, per_kv-major (as `query.reshape(N, kv,
            per_kv * m, d)` lays them out).
        span: (start, stop, q_len): the tile holds query positions [start, stop) of q_len;
            query t sits at own index S - q_len + t and sees own keys up to it (causal).
        prefix_keys: (B, kv, L, d); bias: (B, 1, 1, L).
        keys: (N, kv, S, d) the rows' own keys.
        slot: (1,) long, in a static decode step (one query): the buffer slot of its token;
            the own keys after it are not written yet.
    """
    start, stop, q_len = span
    rows, seen = tile.shape[0], keys.shape[-2]
    # Scores come out in the model dtype, as in HF's eager attention; the float32 padding bias
    # promotes them to float32 for the softmax in the same pass.
    prompt = torch.matmul(_to_groups(tile, prefix_keys.shape[0]), prefix_keys.transpose(-1, -2))
    prompt = _to_rows(prompt + bias, rows)  # (N, kv, per_kv * m, L)
    own = torch.matmul(tile, keys.transpose(-1, -2)).float()  # (N, kv, per_kv * m, S)
    first = seen - q_len + start  # own index of the tile's first query
    if slot is not None:
        own = own.masked_fill(torch.arange(seen, device=tile.device) > slot, float("-inf"))
    elif first < seen - 1:  # some query of the tile would see a later key
        positions = first + torch.arange(stop - start, device=tile.device)  # (m,)
        later = torch.arange(seen, device=tile.device)[None, :] > positions[:, None]  # (m, S)
        own = own.masked_fill(later.repeat(tile.shape[2] // (stop - start), 1), float("-inf"))
    return torch.cat([prompt, own], -1)


def _attend(
    query: Tensor,
    prefix_keys: Tensor,
    prefix_values: Tensor,
    bias: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float,
    keep_lse: bool,
    slot: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Attention output (N, heads, q, dv) and, with `keep_lse`, the float32 log-sum-exp of
    each query's scores (N, heads, q), one tile of queries at a time (`slot`: `_tile_scores`)."""
    rows, heads, q_len, _ = query.shape
    prompts, kv_heads, prompt_len, _ = prefix_keys.shape
    out = query.new_empty(rows, heads, q_len, values.shape[-1])
    lse = query.new_empty(rows, heads, q_len, dtype=torch.float32) if keep_lse else None
    for start, stop in _query_tiles(query, prompt_len + keys.shape[-2]):
        m = stop - start
        tile = (query[:, :, start:stop] * scale).reshape(rows, kv_heads, -1, query.shape[-1])
        scores = _tile_scores(tile, (start, stop, q_len), prefix_keys, bias, keys, slot)
        if lse is not None:
            lse[:, :, start:stop] = torch.logsumexp(scores, -1).reshape(rows, heads, m)
        probs = scores.softmax(-1).to(values.dtype)  # (N, kv, per_kv * m, L + S)
        prompt_part = torch.matmul(_to_groups(probs[..., :prompt_len], prompts), prefix_values)
        tile_out = _to_rows(prompt_part, rows) + torch.matmul(probs[..., prompt_len:], values)
        out[:, :, start:stop] = tile_out.reshape(rows, heads, m, -1)
    return out, lse


class _SharedPrefixAttention(torch.autograd.Function):
    """`_attend` with a backward that recomputes each tile's scores from the saved log-sum-exp.

    The gradient of a softmax over [prompt scores, own scores] is computed block by block with
    the whole row's normaliser (dS = P * (dP - rowsum(dO * O))), so the two blocks need no
    merging; the prompt block's key/value gradients come out at B rows, summed over the group.
    """

    @staticmethod
    def forward(
        ctx: Any,
        query: Tensor,
        prefix_keys: Tensor,
        prefix_values: Tensor,
        bias: Tensor,
        keys: Tensor,
        values: Tensor,
        scale: float,
    ) -> Tensor:
        args = (query, prefix_keys, prefix_values, bias, keys, values, scale)
        ctx.fused = _uses_fused_kernel(query, keys)
        out, lse = _fused_attend(*args) if ctx.fused else _attend(*args, keep_lse=True)
        ctx.save_for_backward(query, prefix_keys, prefix_values, bias, keys, values, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.fused:
            grads = _fused_backward(grad_out.contiguous(), ctx.saved_tensors, ctx.scale)
        else:
            grads = _tiled_backward(grad_out, ctx.saved_tensors, ctx.scale)
        grad_query, grad_prefix_keys, grad_prefix_values, grad_keys, grad_values = grads
        return grad_query, grad_prefix_keys, grad_prefix_values, None, grad_keys, grad_values, None


def _tiled_backward(
    grad_out: Tensor, saved: tuple[Tensor, ...], scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (query, prefix keys, prefix values, keys, values) of `_attend`, each tile's
    scores recomputed from the saved log-sum-exp."""
    query, prefix_keys, prefix_values, bias, keys, values, out, lse = saved
    rows, heads, q_len, dim = query.shape
    prompts, kv_heads, prompt_len, _ = prefix_keys.shape
    dtype = query.dtype
    grad_query = torch.empty_like(query)
    grads = [
        torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        for t in (prefix_keys, prefix_values, keys, values)
    ]
    for start, stop in _query_tiles(query, prompt_len + keys.shape[-2]):
        m = stop - start
        tile = (query[:, :, start:stop] * scale).reshape(rows, kv_heads, -1, dim)
        scores = _tile_scores(tile, (start, stop, q_len), prefix_keys, bias, keys)
        probs = (scores - lse[:, :, start:stop].reshape(rows, kv_heads, -1, 1)).exp()
        grad_tile = grad_out[:, :, start:stop].reshape(rows, kv_heads, -1, out.shape[-1])
        out_tile = out[:, :, start:stop].reshape(rows, kv_heads, -1, out.shape[-1])
        delta = (grad_tile.float() * out_tile.float()).sum(-1, keepdim=True)
        grad_groups = _to_groups(grad_tile, prompts)  # (B, kv, G * per_kv * m, dv)
        grad_probs = torch.cat(
            [
                _to_rows(torch.matmul(grad_groups, prefix_values.transpose(-1, -2)), rows),
                torch.matmul(grad_tile, values.transpose(-1, -2)),
            ],
            -1,
        ).float()
        grad_scores = (probs * (grad_probs - delta)).to(dtype)  # (N, kv, per_kv * m, L + S)
        probs = probs.to(dtype)
        prompt_probs = _to_groups(probs[..., :prompt_len], prompts)
        prompt_grads = _to_groups(grad_scores[..., :prompt_len], prompts)
        grads[0] += torch.matmul(prompt_grads.transpose(-1, -2), _to_groups(tile, prompts))
        grads[1] += torch.matmul(prompt_probs.transpose(-1, -2), grad_groups)
        grads[2] += torch.matmul(grad_scores[..., prompt_len:].transpose(-1, -2), tile)
        grads[3] += torch.matmul(probs[..., prompt_len:].transpose(-1, -2), grad_tile)
        grad_tile_query = _to_rows(torch.matmul(prompt_grads, prefix_keys), rows)
        grad_tile_query = grad_tile_query + torch.matmul(grad_scores[..., prompt_len:], keys)
        grad_query[:, :, start:stop] = (grad_tile_query * scale).reshape(rows, heads, m, dim)
    grad_prefix_keys, grad_prefix_values, grad_keys, grad_values = (
        g.to(t.dtype)
        for g, t in zip(grads, (prefix_keys, prefix_values, keys, values), strict=True)
    )
    return grad_query, grad_prefix_keys, grad_prefix_values, grad_keys, grad_values


def shared_prefix_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prompt: SharedPrompt | None = None,
    decode_slot: Tensor | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention of N = B*G rows over their shared prompt (B rows) plus their own tokens.

    Exact softmax attention over [prompt keys, own keys], computed as one softmax over two
    score blocks: the prompt block is a (G * heads_per_kv * q)-row matrix product per prompt,
    so each prompt's keys are read once for its whole group instead of G times. Queries see
    every own key up to their own position (causal). With grad, the backward recomputes the
    scores (`_SharedPrefixAttention`); a static decode step runs without grad.

    Args:
        module: the attention module (`layer_idx`).
        query: (N, heads, q, head_dim).
        key, value: (N, kv_heads, s, head_dim): the rows' own keys/values so far (s >= q; a
            static decode cache: all its slots, those after `decode_slot` masked out).
        attention_mask: ignored: prompt padding comes from `shared_prompt.bias`.
        scaling: the softmax scale (default 1/sqrt(head_dim)).
        dropout: must be 0.
        shared_prompt: the `SharedPrompt` (passed as a forward kwarg).
        decode_slot: a static `GroupDecodeCache`'s `position` (forward kwarg; None otherwise).

    Returns:
        ((N, q, heads, head_dim) attention output, None).
    """
    if shared_prompt is None:
        raise ValueError(f"{SHARED_PREFIX_ATTENTION} attention needs the shared_prompt kwarg")
    if dropout:
        raise ValueError("shared-prefix attention runs with dropout 0 (GRPO switches it off)")
    layer = module.layer_idx
    args = (shared_prompt.keys[layer], shared_prompt.values[layer], shared_prompt.bias, key, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if decode_slot is not None:
        out, _ = _attend(query, *args, scale, keep_lse=False, slot=decode_slot)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, *args)):
        out = _SharedPrefixAttention.apply(query, *args, scale)
    elif _uses_fused_kernel(query, key):
        out, _ = _fused_attend(query, *args, scale)
    else:
        out, _ = _attend(query, *args, scale, keep_lse=False)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PREFIX_ATTENTION, shared_prefix_attention)


def _implementation(name: str, module: torch.nn.Module) -> Any:
    """The attention function registered as `name` (eager: the model file's own)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def _dispatching_attention(
    inner: str,
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    *args: Any,
    shared_prompt: SharedPrompt | None = None,
    record_prompt: SharedPrompt | None = None,
    **kwargs: Any,
) -> Any:
    """`shared_prefix_attention` when a forward passes `shared_prompt`; otherwise `inner`'s
    attention, after writing the layer's keys/values into `record_prompt` if one is passed."""
    if shared_prompt is not None:
        return shared_prefix_attention(
            module, query, key, value, attention_mask, *args, shared_prompt=shared_prompt, **kwargs
        )
    if record_prompt is not None:
        record_prompt.record(module.layer_idx, key, value)
    return _implementation(inner, module)(
        module, query, key, value, attention_mask, *args, **kwargs
    )


def route_shared_prompt(base: Any) -> None:
    """Route the language model's attention, from now on, through `_dispatching_attention`
    (which runs the model's own attention and mask unless a forward passes `shared_prompt` or
    `record_prompt`). For good, not for a block: gradient checkpointing recomputes layers in
    backward, after the scoring call has returned, and must find the same routing."""
    config = base.get_decoder().config
    inner = config._attn_implementation
    if inner.startswith(SHARED_PROMPT_DISPATCH):
        return
    name = f"{SHARED_PROMPT_DISPATCH}_{inner}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, functools.partial(_dispatching_attention, inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    config._attn_implementation_internal = name


def only_full_attention(base: Any) -> bool:
    """Whether every decoder layer attends to the whole context (no sliding window)."""
    layer_types = getattr(base.get_decoder().config, "layer_types", None) or ["full_attention"]
    return all(kind == "full_attention" for kind in layer_types)


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
