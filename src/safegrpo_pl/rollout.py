"""Group sampling and completion log-probs: the hot path of every GRPO step (SPEC section 4).

`sample_groups` draws G completions for each of B prompts; `completion_logprobs` scores sampled
completions under a model (the policy with grad, the old policy and the reference without).
Both lay out the N = B * G completions group by group: completion i of prompt b is row b*G + i.

How the hot path saves work (all exact: the tests compare with plain full forwards and with
`generate`):
- Shared prefix. Each prompt, image included, is prefilled ONCE (B rows, not B*G), so the vision
  tower runs once per image and the long guided prompt once per prompt, when sampling and when
  scoring; with grad, the G completions backpropagate into the one shared prefill.
- Decoding keeps the prompt's keys/values at B rows: `safegrpo_pl.prefix_attention` (switched on
  only inside the decode loop) lets each group's G rows read their prompt's cache once, and the
  generated tokens' keys/values go into a buffer allocated once instead of being re-concatenated
  at every step.
- Our own decode loop instead of `generate`: temperature, top-k, top-p and suppressed tokens
  only, the LM head on the last position only, finished rows fed padding until all have ended.
  A small model's decode step is hundreds of tiny ops, so per-op cost counts: the loop runs in
  inference mode, computes every step's positions once, and draws its exponential noise with a
  vectorised logarithm (`exponential_draws`, the same numbers as `exponential_`).
- Log-probs run the LM head only on the completion tokens that count (mask 1), in chunks, as
  "picked logit minus logsumexp": never a (N, T, V) log-softmax beside the logits. Scoring
  repeats the prompt cache G times (standard SDPA kernels, which also serve the backward pass).
- Positions are computed here and passed explicitly (Qwen-VL: 3-D rotary positions from the
  model's `get_rope_index` for the prompt, then last position + 1 + step for every generated
  token), so nothing depends on the `rope_deltas` a Qwen-VL model caches between calls.

Deliberate departures and caveats:
- `sample_groups` puts the model in eval mode while sampling (restored afterwards): sampling
  should not apply dropout, and HF layers drop the KV cache under gradient checkpointing in
  train mode.
- With gradient checkpointing active (train mode), `completion_logprobs` therefore falls back to
  one full-sequence forward over the N rows of prompt + completion; each image is still encoded
  once per prompt (its features are repeated through the model's `mm_encoder_outputs` input),
  but the prompt's text is recomputed per completion.
- In train mode with dropout (e.g. LoRA dropout > 0) the G completions of a prompt share one
  dropout mask over the prompt, since they share its prefill.
- In half precision, shared-prefix decoding may differ from scoring in the last bits (see
  `safegrpo_pl.prefix_attention`).
- `shared_prefix=False` is the naive baseline the benchmark compares against: `generate` with
  `num_return_sequences=G` for sampling, and a full forward with `pixel_values` repeated per
  completion for log-probs (the image re-encoded G times, as TRL does).
- Logits are taken as `lm_head(last_hidden_state)`, as in the Qwen families; a model whose
  causal-LM head does more (soft-capping, logit scaling) would need its own hook here.
- Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token that
  crosses the threshold is kept), after temperature and top-k, as `transformers` orders them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor
from transformers import DynamicCache

from safegrpo_pl.inputs import PromptBatch
from safegrpo_pl.model import model_family
from safegrpo_pl.prefix_attention import (
    SHARED_PREFIX_ATTENTION,
    GroupDecodeCache,
    attention_implementation,
)

log = logging.getLogger(__name__)

# Upper bound on the logits of one LM-head chunk (elements): 2**26 float32 = 256 MiB. With a
# 151k vocabulary that is ~440 tokens per chunk; with a tiny vocabulary, a single chunk.
HEAD_CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (defaults: SPEC section 4, the authors' training script).

    Attributes:
        temperature: logits are divided by it before sampling; log-probs use the same value.
        top_p: nucleus sampling: keep the most likely tokens until their mass reaches top_p
            (1.0 = off).
        top_k: keep only the k most likely tokens (0 = off).
        max_new_tokens: completion length limit; a completion cut here is flagged truncated.
        do_sample: False decodes greedily (validation: one deterministic answer per prompt).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4096
    do_sample: bool = True

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"temperature is {self.temperature}; sampling needs > 0 "
                "(use do_sample=False for greedy decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p is {self.top_p}; expected 0 < top_p <= 1 (1.0 = off)")
        if self.top_k < 0:
            raise ValueError(f"top_k is {self.top_k}; expected >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens is {self.max_new_tokens}; expected >= 1")


@dataclass(frozen=True)
class Rollout:
    """N = B * G sampled completions, group by group (completion i of prompt b at row b*G + i).

    Attributes:
        completion_ids: (N, T) long, right-padded with the pad id (also after each first EOS).
        completion_mask: (N, T) float, 1 on sampled tokens up to AND including the first EOS.
        texts: the N decoded completions (up to the first EOS, special tokens removed): what the
            rule reward reads.
        lengths: (N,) long, number of tokens under the mask.
        truncated: (N,) bool, the completion hit max_new_tokens without an EOS.
        group_size: G.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]
    lengths: Tensor
    truncated: Tensor
    group_size: int

    def __len__(self) -> int:
        return len(self.texts)


# -- pure helpers ---------------------------------------------------------------------------


def per_token_logprobs(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at `ids`, as picked logit minus logsumexp.

    Never materialises the log-softmax: one float copy of the logits at most.

    Args:
        logits: (..., V) logits of any float dtype (computed in float32).
        ids: (...) token ids.
        temperature: the sampling temperature (> 0).

    Returns:
        (...) float32 log-probs.
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / top-p support to -inf (top-k first, then top-p).

    Args:
        logits: (N, V) float logits, already divided by the temperature.
        top_k: keep the k largest per row (0 = off); ties at the k-th value are kept.
        top_p: keep the smallest set of most likely tokens with mass >= top_p (1.0 = off).

    Returns:
        (N, V) a new tensor; the input is not modified.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (0 < top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next_tokens(
    logits: Tensor, settings: SamplingSettings, generator: torch.Generator | None = None
) -> Tensor:
    """Pick one token per row: argmax when greedy, else a draw after temperature/top-k/top-p.

    Sampling uses the exponential-race form (argmax of p / E, E ~ Exp(1)), which draws from p
    exactly like `multinomial` but needs no normalisation or host sync (draws: `exponential_draws`).

    Args:
        logits: (N, V) float logits (suppressed tokens already at -inf).
        settings: the sampling settings.
        generator: a torch generator on the logits' device, for reproducible draws.

    Returns:
        (N,) long token ids.
    """
    if not settings.do_sample:
        return logits.argmax(-1)
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    logits = filter_logits(logits, top_k=settings.top_k, top_p=settings.top_p)
    probs = logits.softmax(-1)  # (N, V), a fresh tensor: divided in place
    return probs.div_(exponential_draws(probs, generator)).argmax(-1)


def exponential_draws(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Exp(1) draws shaped and typed like `like`: the numbers `Tensor.exponential_` would give.

    On CPU `exponential_` computes -log1p(-U) on float64 uniforms one element at a time
    (~30 ns each, a tenth of a small model's decode step). For float32, drawing the same
    uniforms with `uniform_` (the same generator stream) and taking log1p in one vectorised op
    costs about half and gives the same float32 draws: the vectorised and scalar float64 log1p
    may differ in the last bit, which rounding to float32 hides in all but ~1 draw in 10^8 (the
    tests check them bit for bit). Other dtypes and devices use `exponential_` itself.
    """
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    uniform = torch.empty(like.shape, dtype=torch.float64).uniform_(generator=generator)
    return uniform.neg_().log1p_().neg_().float()


def rollout_from_ids(
    completion_ids: Tensor,
    *,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    group_size: int,
) -> Rollout:
    """Mask, lengths, truncation flags and texts for raw completion ids (any content after EOS).

    Args:
        completion_ids: (N, T) sampled ids; whatever follows a row's first EOS is ignored.
        tokenizer: decodes the texts (special tokens skipped).
        eos_token_ids: ids that end a completion.
        pad_token_id: written after each first EOS.
        max_new_tokens: the limit the completions were sampled under (for `truncated`).
        group_size: G.

    Returns:
        The `Rollout`, with ids right-trimmed to the longest completion.
    """
    ids = completion_ids.long()
    eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=ids.device)
    is_eos = torch.isin(ids, eos)  # (N, T)
    # A token counts when no EOS came strictly before it: the first EOS itself is kept.
    eos_before = is_eos.long().cumsum(-1) - is_eos.long()  # (N, T)
    keep = eos_before == 0  # (N, T)
    lengths = keep.sum(-1)  # (N,)
    width = int(lengths.max().item()) if ids.shape[0] else 0
    ids = ids.masked_fill(~keep, pad_token_id)[:, :width]
    keep = keep[:, :width]
    truncated = ~is_eos.any(-1) & (lengths >= max_new_tokens)
    rows = [row[:n] for row, n in zip(ids.tolist(), lengths.tolist(), strict=True)]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return Rollout(
        completion_ids=ids,
        completion_mask=keep.float(),
        texts=list(texts),
        lengths=lengths,
        truncated=truncated,
        group_size=group_size,
    )


# -- model plumbing -------------------------------------------------------------------------


def _unwrap(model: Any) -> Any:
    """The transformers model under a peft wrapper (LoRA layers stay active inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _body(base: Any) -> Any:
    """The model without its LM head (`Qwen2_5_VLModel`, `Qwen3VLModel`, `Qwen3Model`, ...)."""
    return getattr(base, base.base_model_prefix)


def _cache_is_dropped(base: Any) -> bool:
    """HF layers discard the KV cache when gradient checkpointing runs in train mode."""
    if not base.training:
        return False
    flag = "is_activation_checkpointing"  # `is_gradient_checkpointing` before transformers 5.x
    if not hasattr(type(base), flag):
        flag = "is_gradient_checkpointing"
    return bool(getattr(base, flag, False))


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _prompt_positions(base: Any, batch: PromptBatch) -> tuple[Tensor, Tensor]:
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
        positions, _ = _body(base).get_rope_index(
            batch.input_ids,
            mm_token_type_ids=token_types,
            image_grid_thw=grid,
            attention_mask=mask,
        )
    return positions, positions.amax(dim=(0, 2)) + 1


def _step_positions(first: Tensor, steps: int, prompt_positions: Tensor) -> Tensor:
    """Positions of `steps` consecutive tokens from `first` (N,), shaped like the prompt's.

    Returns:
        (3, N, S) when `prompt_positions` are 3-D rotary (Qwen-VL), else (N, S).
    """
    positions = first.unsqueeze(-1) + torch.arange(steps, device=first.device)  # (N, S)
    if prompt_positions.ndim == 2:
        return positions
    return positions.unsqueeze(0).expand(prompt_positions.shape[0], -1, -1)


def _check_group_size(group_size: int) -> None:
    if group_size < 1:
        raise ValueError(f"group_size is {group_size}; expected >= 1")


def _prefill(base: Any, batch: PromptBatch, positions: Tensor) -> tuple[Tensor, DynamicCache]:
    """Run the prompt (images included) once; returns its last hidden state (B, H) and cache."""
    cache = DynamicCache(config=base.config)
    out = _body(base)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **batch.model_kwargs,
    )
    return out.last_hidden_state[:, -1], cache  # left padding: column L-1 is real


# -- sampling -------------------------------------------------------------------------------


def sample_groups(
    model: Any,
    batch: PromptBatch,
    *,
    group_size: int,
    settings: SamplingSettings,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    suppress_token_ids: Sequence[int] = (),
    shared_prefix: bool = True,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample `group_size` completions for every prompt of `batch`.

    Args:
        model: a Qwen-VL or text causal LM, or a peft model wrapping one.
        batch: B left-padded prompts (`PromptEncoder.encode`).
        group_size: G completions per prompt (1 for validation).
        settings: temperature, top-p, top-k, length limit, greedy or not.
        tokenizer: decodes the completions into `Rollout.texts`.
        eos_token_ids: ids that end a completion (`safegrpo_pl.model.eos_token_ids`).
        pad_token_id: fills finished rows.
        suppress_token_ids: never sampled (pass `vision_token_ids(tokenizer)`: a random policy
            otherwise emits `<|image_pad|>`, which breaks re-scoring).
        shared_prefix: prefill each prompt once and share its cache across the group (fast);
            False runs `model.generate(num_return_sequences=G)` (the naive baseline).
        generator: seeds the draws (on the model's device); with `shared_prefix=False` it seeds
            a forked global RNG instead, since `generate` takes no generator.

    Returns:
        The `Rollout` of N = B * G completions, group by group.
    """
    _check_group_size(group_size)
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: completions could never end before the limit")
    spec = _DecodeSpec(
        group_size, settings, tuple(eos_token_ids), pad_token_id, tuple(suppress_token_ids)
    )
    if shared_prefix:
        # Inference mode: a decode step is hundreds of tiny ops, and skipping autograd's
        # version counters and view tracking makes each cheaper. Its tensors cannot enter
        # autograd later, hence the clone of the ids (the log-prob passes embed them with grad).
        with torch.inference_mode(), _eval_mode(model):
            ids = _decode_shared(_unwrap(model), batch, spec, generator)
        ids = ids.clone()
    else:
        with torch.no_grad(), _eval_mode(model):
            ids = _decode_generate(model, batch, spec, generator)
    return rollout_from_ids(
        ids,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        max_new_tokens=settings.max_new_tokens,
        group_size=group_size,
    )


@dataclass(frozen=True)
class _DecodeSpec:
    """What both decoders need besides the model, the prompts and the generator."""

    group_size: int
    settings: SamplingSettings
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    suppress_token_ids: tuple[int, ...]


def _decode_shared(
    base: Any, batch: PromptBatch, spec: _DecodeSpec, generator: torch.Generator | None
) -> Tensor:
    """Prefill B prompts once, then decode N = B*G rows against the shared prompt cache.

    Returns:
        (N, T) sampled ids, T <= max_new_tokens (the loop stops once every row has ended).
    """
    device = batch.input_ids.device
    head = base.get_output_embeddings()
    body = _body(base)
    positions, next_position = _prompt_positions(base, batch)
    last_hidden, prompt_cache = _prefill(base, batch, positions)  # (B, H)
    logits = head(last_hidden).float().repeat_interleave(spec.group_size, 0)  # (N, V)
    next_position = next_position.repeat_interleave(spec.group_size)  # (N,)
    max_new, pad = spec.settings.max_new_tokens, spec.pad_token_id
    step_kwargs, attention, cache, context = _decode_state(
        base, batch, prompt_cache, spec.group_size, max_new
    )
    prompt_len = batch.input_ids.shape[1]
    suppress = torch.tensor(sorted(set(spec.suppress_token_ids)), dtype=torch.long, device=device)
    eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=device)
    tokens = torch.full((logits.shape[0], max_new), pad, dtype=torch.long, device=device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    step_positions = _step_positions(next_position, max_new, positions)  # (.., N, max_new)
    with context:
        for step in range(max_new):
            if suppress.numel():
                logits = logits.index_fill_(1, suppress, float("-inf"))
            chosen = choose_next_tokens(logits, spec.settings, generator)  # (N,)
            chosen = chosen.masked_fill(finished, pad)
            tokens[:, step] = chosen
            finished |= torch.isin(chosen, eos)
            if step + 1 == max_new or bool(finished.all()):
                return tokens[:, : step + 1]
            out = body(
                input_ids=tokens[:, step : step + 1],
                attention_mask=None if attention is None else attention[:, : prompt_len + step + 1],
                position_ids=step_positions[..., step : step + 1],
                past_key_values=cache,
                use_cache=True,
                **step_kwargs,
            )
            logits = head(out.last_hidden_state[:, -1]).float()  # (N, V)
    return tokens


def _only_full_attention(base: Any) -> bool:
    """Whether every decoder layer attends to the whole context (no sliding window)."""
    layer_types = getattr(base.get_decoder().config, "layer_types", None) or ["full_attention"]
    return all(kind == "full_attention" for kind in layer_types)


def _decode_state(
    base: Any, batch: PromptBatch, prompt_cache: DynamicCache, group_size: int, max_new: int
) -> tuple[dict[str, Any], Tensor | None, Any, contextlib.AbstractContextManager[Any]]:
    """The cache, mask and attention routing of the decode loop.

    Full-attention models decode with `GroupDecodeCache` and `shared_prefix_attention` (the
    prompt's K/V stay B rows; no attention mask needed). Others (sliding-window layers) repeat
    the prompt cache G times and decode with their own attention and a 2-D mask.

    Returns:
        (extra forward kwargs, (N, L + max_new) mask or None, cache, context to decode in).
    """
    if _only_full_attention(base):
        cache = GroupDecodeCache(prompt_cache, batch.attention_mask, group_size, max_new)
        return (
            {"group_cache": cache},
            None,
            cache,
            attention_implementation(base, SHARED_PREFIX_ATTENTION),
        )
    log.debug("sliding-window layers: decoding over a prompt cache repeated %d times", group_size)
    prompt_cache.batch_repeat_interleave(group_size)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, 0)  # (N, L)
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], max_new)], 1)
    return {}, attention, prompt_cache, contextlib.nullcontext()


def _decode_generate(
    model: Any, batch: PromptBatch, spec: _DecodeSpec, generator: torch.Generator | None
) -> Tensor:
    """The naive baseline: `generate` with `num_return_sequences=G`; returns (N, T) ids.

    Greedy decoding gives G equal rows, and `generate` refuses `num_return_sequences > 1`
    without sampling: it decodes once per prompt and repeats the rows.
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
    with rng:
        if generator is not None:
            torch.manual_seed(seed)
        sequences = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            **batch.model_kwargs,
            **options,
        )
    completions = sequences[:, batch.input_ids.shape[1] :]  # (B * copies, T)
    return completions.repeat_interleave(spec.group_size // copies, 0)


# -- log-probs ------------------------------------------------------------------------------


def completion_logprobs(
    model: Any,
    batch: PromptBatch,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    group_size: int,
    temperature: float = 1.0,
    shared_prefix: bool = True,
    recompute_head: bool = False,
) -> Tensor:
    """Per-token log-probs of sampled completions under `model`, prompt (and image) as context.

    Works with and without grad: the policy's training forward, old and reference log-probs.
    The log-prob of completion token t comes from the logits at the position before it,
    divided by `temperature`.

    Args:
        model: a Qwen-VL or text causal LM, or a peft model wrapping one (under
            `disable_adapter()` it gives the base model's log-probs).
        batch: the B prompts the completions were sampled from.
        completion_ids: (N, T) ids, N = B * G, group by group.
        completion_mask: (N, T) 1 on tokens to score (through the first EOS), 0 after.
        group_size: G.
        temperature: the sampling temperature (SPEC: log-probs from logits / temperature).
        shared_prefix: prefill each prompt once and share its cache across the group; False
            runs a full forward per completion with the image re-encoded (the naive baseline).
        recompute_head: with grad, recompute each LM-head chunk's logits in backward instead of
            keeping (tokens, V) logits alive for it (saves memory, costs one more head pass).

    Returns:
        (N, T) float32 log-probs, 0 where the mask is 0.
    """
    _check_group_size(group_size)
    num_prompts = batch.input_ids.shape[0]
    if completion_ids.ndim != 2 or completion_ids.shape[0] != num_prompts * group_size:
        raise ValueError(
            f"completion_ids has shape {tuple(completion_ids.shape)}; expected "
            f"({num_prompts} prompts x {group_size} per group, T) = ({num_prompts * group_size}, T)"
        )
    if completion_mask.shape != completion_ids.shape:
        raise ValueError(
            f"completion_mask {tuple(completion_mask.shape)} and completion_ids "
            f"{tuple(completion_ids.shape)} must have the same shape"
        )
    if not temperature > 0:
        raise ValueError(f"temperature is {temperature}; log-probs need > 0")
    base = _unwrap(model)
    if completion_ids.shape[1] == 0:
        return completion_mask.new_zeros(completion_ids.shape, dtype=torch.float32)
    if not shared_prefix:
        hidden = _full_sequence_hidden(base, batch, completion_ids, group_size, False)
    elif _cache_is_dropped(base):
        log.debug("gradient checkpointing drops the KV cache: scoring with full-sequence forwards")
        hidden = _full_sequence_hidden(base, batch, completion_ids, group_size, True)
    else:
        hidden = _shared_prefix_hidden(base, batch, completion_ids, group_size)
    return _masked_head_logprobs(
        base.get_output_embeddings(),
        hidden,
        completion_ids,
        completion_mask,
        temperature,
        recompute_head,
    )


def _shared_prefix_hidden(
    base: Any, batch: PromptBatch, completion_ids: Tensor, group_size: int
) -> Tensor:
    """Hidden states that predict each completion token, via one prefill per prompt: (N, T, H)."""
    positions, next_position = _prompt_positions(base, batch)
    last_hidden, cache = _prefill(base, batch, positions)  # (B, H)
    first = last_hidden.repeat_interleave(group_size, 0).unsqueeze(1)  # (N, 1, H)
    steps = completion_ids.shape[1] - 1
    if steps == 0:
        return first
    cache.batch_repeat_interleave(group_size)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, 0)  # (N, L)
    # Tokens after a row's EOS only ever see the prompt and earlier tokens (causal), so an
    # all-ones mask over the completion is exact where it matters (mask 1).
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], steps)], 1)
    out = _body(base)(
        input_ids=completion_ids[:, :-1],
        attention_mask=attention,
        position_ids=_step_positions(next_position.repeat_interleave(group_size), steps, positions),
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([first, out.last_hidden_state], 1)  # (N, T, H)


def _repeat_image_features(features: Any, group_size: int) -> Any:
    """Repeat each image's vision-tower output (and Qwen3-VL deepstack features) G times."""

    def repeat(per_image: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return tuple(t for t in per_image for _ in range(group_size))

    features.pooler_output = repeat(features.pooler_output)
    deepstack = getattr(features, "deepstack_features", None)
    if deepstack is not None:
        features.deepstack_features = [repeat(level) for level in deepstack]
    return features


def _full_sequence_hidden(
    base: Any,
    batch: PromptBatch,
    completion_ids: Tensor,
    group_size: int,
    reuse_image_features: bool,
) -> Tensor:
    """Hidden states that predict each completion token from one forward over prompt+completion.

    Args:
        reuse_image_features: encode each image once and repeat its features per completion
            (the gradient-checkpointing fallback); False repeats `pixel_values` instead, so the
            vision tower runs once per completion (the naive baseline).

    Returns:
        (N, T, H).
    """
    steps = completion_ids.shape[1]
    prompt_len = batch.input_ids.shape[1]
    positions, next_position = _prompt_positions(base, batch)
    prompt_positions = positions.repeat_interleave(group_size, dim=-2)  # (.., N, L)
    tail = _step_positions(next_position.repeat_interleave(group_size), steps, positions)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, 0)  # (N, L)
    kwargs: dict[str, Any] = {}
    vision = batch.model_kwargs
    if "pixel_values" in vision:
        grid = vision["image_grid_thw"]
        kwargs["image_grid_thw"] = grid.repeat_interleave(group_size, 0)
        if reuse_image_features:
            features = _body(base).get_image_features(
                vision["pixel_values"], grid, return_dict=True
            )
            kwargs["mm_encoder_outputs"] = {"image": _repeat_image_features(features, group_size)}
        else:
            patches = grid.prod(-1).tolist()  # patches per image, back to back in pixel_values
            per_image = torch.split(vision["pixel_values"], patches)
            kwargs["pixel_values"] = torch.cat([p for p in per_image for _ in range(group_size)])
    if "mm_token_type_ids" in vision:
        types = vision["mm_token_type_ids"].repeat_interleave(group_size, 0)
        kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(types.shape[0], steps)], 1)
    out = _body(base)(
        input_ids=torch.cat([batch.input_ids.repeat_interleave(group_size, 0), completion_ids], 1),
        attention_mask=torch.cat(
            [prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], steps)], 1
        ),
        position_ids=torch.cat([prompt_positions, tail], -1),
        use_cache=False,
        **kwargs,
    )
    return out.last_hidden_state[:, prompt_len - 1 : prompt_len - 1 + steps]  # (N, T, H)


def _masked_head_logprobs(
    head: Any,
    hidden: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    recompute: bool,
) -> Tensor:
    """LM head + log-probs on the mask-1 positions only, in chunks: (N, T) float32."""
    keep = completion_mask.bool()  # (N, T)
    states = hidden[keep]  # (M, H)
    targets = completion_ids[keep]  # (M,)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)

    def score(states_chunk: Tensor, targets_chunk: Tensor) -> Tensor:
        return per_token_logprobs(head(states_chunk), targets_chunk, temperature)

    pieces = []
    for start in range(0, states.shape[0], chunk):
        args = (states[start : start + chunk], targets[start : start + chunk])
        if recompute and torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(score, *args, use_reentrant=False))
        else:
            pieces.append(score(*args))
    values = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
    return torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device).masked_scatter(
        keep, values
    )
