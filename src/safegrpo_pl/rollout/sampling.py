"""Group sampling: G completions for each of B prompts, the hot path of every GRPO step.

See docs/method.md section 4. `sample_groups` lays out the N = B * G completions group by group:
completion i of prompt b is row b*G + i. `safegrpo_pl.rollout.logprobs` scores them.

How the hot path saves work (all exact: the tests compare with `generate`):
- Shared prefix. Each prompt, image included, is prefilled ONCE (B rows, not B*G), so the vision
  tower runs once per image and the long guided prompt once per prompt.
- Decoding keeps the prompt's keys/values at B rows: `safegrpo_pl.rollout.prefix_attention` (switched on
  only inside the decode loop) lets each group's G rows read their prompt's cache once, and the
  generated tokens' keys/values go into a buffer that doubles as it fills instead of being
  re-concatenated at every step.
- Bounded memory: `chunk_size` decodes that many prompts (whole groups) at a time; each prompt
  draws its noise from its own generator, so the samples do not depend on the chunking
  (`safegrpo_pl.rollout.chunking`).
- Our own decode loop instead of `generate`: temperature, top-k, top-p and suppressed tokens
  only, the LM head on the last position only, finished rows fed padding until all have ended.
  A small model's decode step is hundreds of tiny ops, so per-op cost counts: the loop runs in
  inference mode, computes every step's positions once, and draws its exponential noise with a
  vectorised logarithm (`exponential_draws`, the same numbers as `exponential_`).
- Positions are passed explicitly (`safegrpo_pl.rollout.prefill`).
- `SamplingSettings.decode` picks how the steps run: "growing" (the buffer above), "static" (the
  whole buffer from the start: every step has the same shapes) or "compiled" (static, with the
  single-token forward and LM head compiled by `torch.compile`; the token choice stays eager,
  so the draws are the same numbers). Measured on CPU in the README (`scripts/decode_speed.py`):
  compiling takes tens of seconds per process and did not pay off on the demo or the bench,
  hence "growing" by default.

Deliberate departures and caveats:
- `sample_groups` puts the model in eval mode while sampling (restored afterwards): sampling
  should not apply dropout, and HF layers drop the KV cache under gradient checkpointing in
  train mode.
- In half precision, shared-prefix decoding may differ from scoring in the last bits (see
  `safegrpo_pl.rollout.prefix_attention`).
- `sync_ranks=True` (sharded weights on several processes): every rank decodes until the rows
  of ALL ranks have ended, with one small all-reduce per step, so ranks run the same number of
  forwards; the loop then runs under `no_grad`, not inference mode, since FSDP's gathered
  weights must stay usable by autograd afterwards.
- `shared_prefix=False` is the naive baseline the benchmark compares against: `generate` with
  `num_return_sequences=G` (`safegrpo_pl.rollout.sampling`).
- Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token that
  crosses the threshold is kept), after temperature and top-k, as `transformers` orders them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from transformers import DynamicCache

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.rl.distributed import all_done
from safegrpo_pl.rollout.chunking import chunked_decode
from safegrpo_pl.rollout.prefill import (
    cache_kwargs,
    check_group_size,
    eval_mode,
    model_body,
    prefill_prompts,
    prompt_positions,
    step_positions,
    unwrap_model,
)
from safegrpo_pl.rollout.prefix_attention import (
    SHARED_PREFIX_ATTENTION,
    GroupDecodeCache,
    attention_implementation,
    only_full_attention,
)

Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for all rows, one per equal block of rows (per prompt), or the global RNG."""


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
    logits: Tensor, settings: SamplingSettings, generator: Generators = None
) -> Tensor:
    """Pick one token per row: argmax when greedy, else a draw after temperature/top-k/top-p.

    Sampling uses the exponential-race form (argmax of p / E, E ~ Exp(1)), which draws from p
    exactly like `multinomial` but needs no normalisation or host sync (draws: `exponential_draws`).

    Args:
        logits: (N, V) float logits (suppressed tokens already at -inf).
        settings: the sampling settings.
        generator: a torch generator on the logits' device, for reproducible draws, or one per
            equal block of rows (`exponential_draws`).

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


def exponential_draws(like: Tensor, generator: Generators = None) -> Tensor:
    """Exp(1) draws shaped and typed like `like`: the numbers `Tensor.exponential_` would give.

    A sequence of k generators splits the rows into k equal blocks, each drawn from its own
    generator (one per prompt: a prompt's draws then do not depend on the other rows).

    On CPU `exponential_` computes -log1p(-U) on float64 uniforms one element at a time
    (~30 ns each, a tenth of a small model's decode step). For float32, drawing the same
    uniforms with `uniform_` (the same generator stream) and taking log1p in one vectorised op
    costs about half and gives the same float32 draws: the vectorised and scalar float64 log1p
    may differ in the last bit, which rounding to float32 hides in all but ~1 draw in 10^8 (the
    tests check them bit for bit). Other dtypes and devices use `exponential_` itself.
    """
    if isinstance(generator, Sequence):
        blocks = like.split(like.shape[0] // len(generator), 0)
        return torch.cat([exponential_draws(b, g) for b, g in zip(blocks, generator, strict=True)])
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    uniform = torch.empty(like.shape, dtype=torch.float64).uniform_(generator=generator)
    return uniform.neg_().log1p_().neg_().float()


log = logging.getLogger(__name__)

DecodeMode = Literal["growing", "static", "compiled"]
"""How the decode steps run (`SamplingSettings.decode`)."""


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (defaults: docs/method.md section 4, the authors' training script).

    Attributes:
        temperature: logits are divided by it before sampling; log-probs use the same value.
        top_p: nucleus sampling: keep the most likely tokens until their mass reaches top_p
            (1.0 = off).
        top_k: keep only the k most likely tokens (0 = off).
        max_new_tokens: completion length limit; a completion cut here is flagged truncated.
        do_sample: False decodes greedily (validation: one deterministic answer per prompt).
        decode: how the decode steps run; all three give the same tokens from the same seed
            (up to float rounding in "compiled"). "growing": eager, the generated tokens' cache
            doubles as it fills; "static": eager, the cache holds `max_new_tokens` from the start
            and every step has the same shapes; "compiled": static, with each step's forward
            and LM head compiled by `torch.compile` (tens of seconds of compiling per process
            on CPU; see the README before turning it on). Models with sliding-window layers
            decode "growing" only.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 4096
    do_sample: bool = True
    decode: DecodeMode = "growing"

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
        if self.decode not in get_args(DecodeMode):
            raise ValueError(
                f"decode is {self.decode!r}; expected one of {', '.join(get_args(DecodeMode))}"
            )


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
        sampler_logp: (N, T) float32 log-probs of the sampled tokens under the sampler's own
            logits (divided by the temperature, before top-k / top-p / suppression), 0 off the
            mask; None unless asked for (`sample_groups(keep_logprobs=True)`).
    """

    completion_ids: Tensor
    completion_mask: Tensor
    texts: list[str]
    lengths: Tensor
    truncated: Tensor
    group_size: int
    sampler_logp: Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class DecodeSpec:
    """What a decoder needs besides the model, the prompts and the generator."""

    group_size: int
    settings: SamplingSettings
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    suppress_token_ids: tuple[int, ...]
    sync_ranks: bool = False
    keep_logprobs: bool = False


def rollout_from_ids(
    completion_ids: Tensor,
    *,
    tokenizer: Any,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    max_new_tokens: int,
    group_size: int,
    sampler_logp: Tensor | None = None,
) -> Rollout:
    """Mask, lengths, truncation flags and texts for raw completion ids (any content after EOS).

    Args:
        completion_ids: (N, T) sampled ids; whatever follows a row's first EOS is ignored.
        tokenizer: decodes the texts (special tokens skipped).
        eos_token_ids: ids that end a completion.
        pad_token_id: written after each first EOS.
        max_new_tokens: the limit the completions were sampled under (for `truncated`).
        group_size: G.
        sampler_logp: (N, T) the sampler's log-probs of `completion_ids`, or None.

    Returns:
        The `Rollout`, with ids (and log-probs) right-trimmed to the longest completion.
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
    if sampler_logp is not None:
        sampler_logp = sampler_logp[:, :width].float().masked_fill(~keep, 0.0)
    return Rollout(
        completion_ids=ids,
        completion_mask=keep.float(),
        texts=list(texts),
        lengths=lengths,
        truncated=truncated,
        group_size=group_size,
        sampler_logp=sampler_logp,
    )


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
    chunk_size: int | None = None,
    sync_ranks: bool = False,
    keep_logprobs: bool = False,
) -> Rollout:
    """Sample `group_size` completions for every prompt of `batch`.

    Args:
        model: a Qwen-VL or text causal LM, or a peft model wrapping one.
        batch: B left-padded prompts (`PromptEncoder.encode`).
        group_size: G completions per prompt (1 for validation).
        settings: temperature, top-p, top-k, length limit, greedy or not.
        tokenizer: decodes the completions into `Rollout.texts`.
        eos_token_ids: ids that end a completion (`safegrpo_pl.policy.model.eos_token_ids`).
        pad_token_id: fills finished rows.
        suppress_token_ids: never sampled (pass `vision_token_ids(tokenizer)`: a random policy
            otherwise emits `<|image_pad|>`, which breaks re-scoring).
        shared_prefix: prefill each prompt once and share its cache across the group (fast);
            False runs `model.generate(num_return_sequences=G)` (the naive baseline).
        generator: seeds the draws (on the model's device): it seeds one generator per prompt
            (see `safegrpo_pl.rollout.chunking`); with `shared_prefix=False` it seeds a forked global
            RNG instead, since `generate` takes no generator (and the draws then depend on the
            chunking).
        chunk_size: prompts decoded at once (whole groups); None = all of them. Memory only.
        sync_ranks: decode until every row of every rank has ended (see the module doc); all
            ranks must call this together (with the same number of prompts and chunks).
        keep_logprobs: keep the sampler's log-prob of every sampled token
            (`Rollout.sampler_logp`), to measure and correct the sampler/trainer mismatch;
            shared-prefix sampling only.

    Returns:
        The `Rollout` of N = B * G completions, group by group.
    """
    check_group_size(group_size)
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: completions could never end before the limit")
    if settings.decode == "compiled" and sync_ranks:
        raise ValueError(
            "model.sampling.decode 'compiled' is not supported with sharded weights (several "
            "processes); use 'static' or 'growing'"
        )
    if keep_logprobs and not shared_prefix:
        raise ValueError(
            "the sampler's log-probs are kept by the shared-prefix decoder only; set "
            "model.shared_prefix: true, or turn off model.loss.log_sampler_kl and rollout_is"
        )
    spec = DecodeSpec(
        group_size,
        settings,
        tuple(eos_token_ids),
        pad_token_id,
        tuple(suppress_token_ids),
        sync_ranks=sync_ranks,
        keep_logprobs=keep_logprobs,
    )
    decode = _decode_shared_prefix if shared_prefix else _generate_without_logprobs
    per_prompt = shared_prefix and settings.do_sample  # the naive path's generate takes none
    ids, sampler_logp = chunked_decode(
        lambda sub, draws: decode(model, sub, spec, draws),
        batch,
        chunk_size,
        generator,
        per_prompt=per_prompt,
        pad_token_id=pad_token_id,
    )
    return rollout_from_ids(
        ids,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        max_new_tokens=settings.max_new_tokens,
        group_size=group_size,
        sampler_logp=sampler_logp,
    )


def _decode_shared_prefix(
    model: Any, batch: PromptBatch, spec: DecodeSpec, generator: Generators
) -> tuple[Tensor, Tensor | None]:
    """The decode loop in inference and eval mode; returns (N, T) ids usable with autograd.

    Inference mode: a decode step is hundreds of tiny ops, and skipping autograd's version
    counters and view tracking makes each cheaper. Its tensors cannot enter autograd later, hence
    the clone of the ids (the log-prob passes embed them with grad). With `sync_ranks` (sharded
    weights) plain `no_grad`: weights gathered in inference mode could not be used for training.
    """
    grad_mode = torch.no_grad() if spec.sync_ranks else torch.inference_mode()
    with grad_mode, eval_mode(model):
        ids, logp = _decode_shared(unwrap_model(model), batch, spec, generator)
    return ids.clone(), None if logp is None else logp.clone()


def _decode_shared(
    base: Any, batch: PromptBatch, spec: DecodeSpec, generator: Generators
) -> tuple[Tensor, Tensor | None]:
    """Prefill B prompts once, then decode N = B*G rows against the shared prompt cache.

    Returns:
        (N, T) sampled ids, T <= max_new_tokens (the loop stops once every row has ended),
        and with `spec.keep_logprobs` (N, T) their log-probs under the loop's own logits
        divided by the temperature (0 after a row has finished); else None.
    """
    device = batch.input_ids.device
    head = base.get_output_embeddings()
    body = model_body(base)
    positions, next_position = prompt_positions(base, batch)
    last_hidden, prompt_cache = prefill_prompts(base, batch, positions)  # (B, H)
    logits = head(last_hidden).float().repeat_interleave(spec.group_size, 0)  # (N, V)
    next_position = next_position.repeat_interleave(spec.group_size)  # (N,)
    max_new, pad = spec.settings.max_new_tokens, spec.pad_token_id
    static = spec.settings.decode != "growing"
    step_kwargs, attention, cache, context = _decode_state(
        base, batch, prompt_cache, spec.group_size, max_new, static=static
    )
    forward = _compiled_decode_step() if spec.settings.decode == "compiled" else decode_step
    prompt_len = batch.input_ids.shape[1]
    suppress = torch.tensor(sorted(set(spec.suppress_token_ids)), dtype=torch.long, device=device)
    eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=device)
    tokens = torch.full((logits.shape[0], max_new), pad, dtype=torch.long, device=device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    token_positions = step_positions(next_position, max_new, positions)  # (.., N, max_new)
    logps = (
        torch.zeros(tokens.shape, dtype=torch.float32, device=device)
        if spec.keep_logprobs
        else None
    )
    scale = spec.settings.temperature if spec.settings.do_sample else 1.0
    with context:
        for step in range(max_new):
            if logps is not None:  # the full distribution's normaliser, as the trainer's
                normaliser = torch.logsumexp(logits / scale, dim=-1)  # (N,)
            if suppress.numel():
                logits = logits.index_fill_(1, suppress, float("-inf"))
            chosen = choose_next_tokens(logits, spec.settings, generator)  # (N,)
            chosen = chosen.masked_fill(finished, pad)
            tokens[:, step] = chosen
            if logps is not None:
                picked = logits.gather(1, chosen[:, None]).squeeze(1) / scale - normaliser
                logps[:, step] = picked.masked_fill(finished, 0.0)
            finished |= torch.isin(chosen, eos)
            done = all_done(finished) if spec.sync_ranks else bool(finished.all())
            if step + 1 == max_new or done:
                return tokens[:, : step + 1], None if logps is None else logps[:, : step + 1]
            logits = forward(
                body,
                head,
                tokens[:, step : step + 1],
                token_positions[..., step : step + 1],
                attention_mask=None if attention is None else attention[:, : prompt_len + step + 1],
                **cache_kwargs(body, cache),
                use_cache=True,
                **step_kwargs,
            )  # (N, V)
            if static:
                cache.advance()
    return tokens, logps


def decode_step(
    body: Any, head: torch.nn.Module, input_ids: Tensor, position_ids: Tensor, **kwargs: Any
) -> Tensor:
    """One decode step: the forward of one new token per row, then the LM head, in float32.

    Args:
        body: the model without its LM head (`model_body`).
        head: the LM head.
        input_ids: (N, 1) the last chosen tokens.
        position_ids: (.., N, 1) their positions.
        **kwargs: the cache, mask and attention arguments of the forward.

    Returns:
        (N, V) float32 logits of the next token.
    """
    out = body(input_ids=input_ids, position_ids=position_ids, **kwargs)
    return head(out.last_hidden_state[:, -1]).float()


@functools.cache
def _compiled_decode_step() -> Callable[..., Tensor]:
    """`decode_step` under `torch.compile`, built once per process. `dynamic=True`: a new prompt
    length, chunk or batch size reuses the graph; G 1 (validation), where the rows equal the
    prompts, compiles once more."""
    return torch.compile(decode_step, dynamic=True)


def _decode_state(
    base: Any,
    batch: PromptBatch,
    prompt_cache: DynamicCache,
    group_size: int,
    max_new: int,
    *,
    static: bool,
) -> tuple[dict[str, Any], Tensor | None, Any, contextlib.AbstractContextManager[Any]]:
    """The cache, mask and attention routing of the decode loop.

    Full-attention models decode with `GroupDecodeCache` (static or growing) and
    `shared_prefix_attention` (the prompt's K/V stay B rows; no attention mask needed). Others
    (sliding-window layers) repeat the prompt cache G times and decode with their own attention
    and a 2-D mask, growing only.

    Returns:
        (extra forward kwargs, (N, L + max_new) mask or None, cache, context to decode in).
    """
    if only_full_attention(base):
        cache = GroupDecodeCache(
            prompt_cache, batch.attention_mask, group_size, max_new, static=static
        )
        return (
            {"shared_prompt": cache.prompt, "decode_slot": cache.position},
            None,
            cache,
            attention_implementation(base, SHARED_PREFIX_ATTENTION),
        )
    if static:
        raise ValueError(
            "model.sampling.decode 'static' and 'compiled' need every decoder layer to attend to "
            "the whole context; this model has sliding-window layers: use 'growing'"
        )
    log.debug("sliding-window layers: decoding over a prompt cache repeated %d times", group_size)
    prompt_cache.batch_repeat_interleave(group_size)
    prompt_mask = batch.attention_mask.repeat_interleave(group_size, 0)  # (N, L)
    attention = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0], max_new)], 1)
    return {}, attention, prompt_cache, contextlib.nullcontext()


def _generate_without_logprobs(
    model: Any, batch: PromptBatch, spec: DecodeSpec, generator: torch.Generator | None
) -> tuple[Tensor, None]:
    return generate_completions(model, batch, spec, generator), None


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
