"""Completion log-probs: sampled completions scored under a model, the other half of a GRPO step.

See docs/method.md section 4. `completion_logprobs` scores the N = B * G completions of
`safegrpo_pl.rollout.sampling` (row b*G + i: completion i of prompt b) under the policy with grad, and
under the old policy and the reference without.

How the hot path saves work (all exact: the tests compare with plain full forwards):
- Shared prefix. Each prompt, image included, runs ONCE (B rows, not B*G), so the vision
  tower runs once per image and the long guided prompt once per prompt; the G completions
  attend to one copy of its keys/values (`safegrpo_pl.rollout.prefix_attention`), and with
  grad backpropagate into it, gradient checkpointing included.
- The LM head runs only on the completion tokens that count (mask 1), in chunks, as "picked
  logit minus logsumexp": never a (N, T, V) log-softmax beside the logits.
  With grad, `recompute_head` keeps no chunk's logits for backward (recomputed there): the
  training forward holds one chunk of (tokens, V) logits at most.
- Positions are passed explicitly (`safegrpo_pl.rollout.prefill`).

Deliberate departures and caveats:
- Models with sliding-window layers are scored with one full-sequence forward over the N rows
  of prompt + completion; each image is still encoded once per prompt (its features are
  repeated through the model's `mm_encoder_outputs` input), but the prompt's text is recomputed
  per completion.
- Dropout must be off in the attention (GRPO's `PolicyRunner` switches it off everywhere);
  elsewhere the G completions of a prompt would share one dropout mask over the prompt.
- `shared_prefix=False` is the naive baseline the benchmark compares against: a full forward
  with `pixel_values` repeated per completion (`safegrpo_pl.rollout.sampling`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor

from safegrpo_pl.policy.inputs import PromptBatch
from safegrpo_pl.rollout.prefill import (
    check_group_size,
    full_sequence_hidden,
    model_body,
    prompt_positions,
    repeated_pixels_hidden,
    step_positions,
    unwrap_model,
)
from safegrpo_pl.rollout.prefix_attention import (
    SharedPrompt,
    only_full_attention,
    route_shared_prompt,
)

log = logging.getLogger(__name__)

# Upper bound on the logits of one LM-head chunk (elements): 2**26 float32 = 256 MiB. With a
# 151k vocabulary that is ~440 tokens per chunk; with a tiny vocabulary, a single chunk.
HEAD_CHUNK_ELEMENTS = 2**26


def _scaled_logits(logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits


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
    logits = _scaled_logits(logits, ids, temperature)
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)


class _Entropy(torch.autograd.Function):
    """`H(z) = logsumexp(z) - sum(softmax(z) * z)` over the last dim, differentiable.

    Its backward, `dH/dz = -p * (z - sum(p z))`, recomputes `p` from `z`, which the log-prob's
    logsumexp keeps anyway: the entropy adds no (tokens, V) tensor to what backward holds. The
    forward has one (tokens, V) float32 temporary at a time, as the logsumexp itself
    (`safegrpo_pl.plan.memory` counts one).
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (..., 1)
        entropy = lse.squeeze(-1) - (z - lse).exp_().mul_(z).sum(-1)  # (...)
        ctx.save_for_backward(z, lse)
        return entropy

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        z, lse = ctx.saved_tensors
        p = (z - lse).exp_()  # (..., V)
        mean = (p * z).sum(-1, keepdim=True)  # (..., 1)
        return p.mul_(z - mean).mul_(-grad.unsqueeze(-1))


def logprobs_and_entropy(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """`per_token_logprobs` and the entropy of softmax(logits / temperature), per position.

    Args:
        logits: (..., V) logits of any float dtype (computed in float32).
        ids: (...) token ids.
        temperature: the sampling temperature (> 0).
        entropy_grad: the entropy carries a gradient (an entropy term in the loss); otherwise
            it is computed without one (logging only).

    Returns:
        ((...) float32 log-probs, (...) float32 entropies in nats).
    """
    z = _scaled_logits(logits, ids, temperature)  # (..., V)
    picked = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (...)
    logp = picked - torch.logsumexp(z, dim=-1)
    if entropy_grad:
        return logp, _Entropy.apply(z)
    with torch.no_grad():
        return logp, _Entropy.apply(z)


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
        temperature: the sampling temperature (docs/method.md section 4: log-probs from
            logits / temperature).
        shared_prefix: run each prompt once and share its keys/values across the group; False
            runs a full forward per completion with the image re-encoded (the naive baseline).
        recompute_head: with grad and more than one LM-head chunk, recompute each chunk's
            logits in backward instead of keeping all (tokens, V) logits alive for it (one
            more head pass). A single chunk is kept: its logits are the backward's peak
            either way.

    Returns:
        (N, T) float32 log-probs, 0 where the mask is 0.
    """
    options = dict(group_size=group_size, temperature=temperature, shared_prefix=shared_prefix)
    return _completion_scores(
        model, batch, completion_ids, completion_mask, **options, recompute_head=recompute_head
    )[0]


def completion_logprobs_and_entropy(
    model: Any,
    batch: PromptBatch,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    group_size: int,
    temperature: float = 1.0,
    shared_prefix: bool = True,
    recompute_head: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """`completion_logprobs` and the policy's token entropy at the same positions.

    The entropy of softmax(logits / temperature) is computed chunk by chunk from the same
    LM-head logits as the log-probs (`logprobs_and_entropy`), so no extra (tokens, V) tensor
    outlives its chunk. `entropy_grad`: the entropy carries a gradient (an entropy bonus);
    otherwise it is computed without one.

    Returns:
        ((N, T) float32 log-probs, (N, T) float32 entropies), both 0 where the mask is 0.
    """
    options = dict(group_size=group_size, temperature=temperature, shared_prefix=shared_prefix)
    logp, entropy = _completion_scores(
        model,
        batch,
        completion_ids,
        completion_mask,
        **options,
        recompute_head=recompute_head,
        entropy=True,
        entropy_grad=entropy_grad,
    )
    assert entropy is not None
    return logp, entropy


def _completion_scores(
    model: Any,
    batch: PromptBatch,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    group_size: int,
    temperature: float,
    shared_prefix: bool,
    recompute_head: bool,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """(N, T) log-probs and, with `entropy`, (N, T) entropies (see `completion_logprobs`)."""
    _check_completions(batch, completion_ids, completion_mask, group_size, temperature)
    base = unwrap_model(model)
    if completion_ids.shape[1] == 0:
        empty = completion_mask.new_zeros(completion_ids.shape, dtype=torch.float32)
        return empty, (empty.clone() if entropy else None)
    hidden_states = _prompt_context_hidden if shared_prefix else repeated_pixels_hidden
    return _masked_head_logprobs(
        base.get_output_embeddings(),
        hidden_states(base, batch, completion_ids, group_size),
        completion_ids,
        completion_mask,
        temperature,
        recompute_head,
        entropy=entropy,
        entropy_grad=entropy_grad,
    )


def _check_completions(
    batch: PromptBatch,
    completion_ids: Tensor,
    completion_mask: Tensor,
    group_size: int,
    temperature: float,
) -> None:
    """Raise, naming the argument, when the completions do not fit the batch and group size."""
    check_group_size(group_size)
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


def _prompt_context_hidden(
    base: Any, batch: PromptBatch, completion_ids: Tensor, group_size: int
) -> Tensor:
    """Hidden states (N, T, H) over one copy of each prompt; a full forward per completion for
    models with sliding-window layers (`shared_prefix_attention` attends to all of the prompt)."""
    if not only_full_attention(base):
        log.debug("sliding-window layers: scoring with full-sequence forwards")
        return _reused_features_hidden(base, batch, completion_ids, group_size)
    return _shared_prefix_hidden(base, batch, completion_ids, group_size)


def _shared_prefix_hidden(
    base: Any, batch: PromptBatch, completion_ids: Tensor, group_size: int
) -> Tensor:
    """Hidden states that predict each completion token: (N, T, H).

    Each prompt runs once (B rows) with the model's own attention, its keys/values recorded
    into a `SharedPrompt`; the N completions then attend to them through
    `shared_prefix_attention` (no KV cache, so gradient checkpointing keeps the prompt shared).
    """
    positions, next_position = prompt_positions(base, batch)
    prompt = SharedPrompt.for_prompts(batch.attention_mask)
    body = model_body(base)
    route_shared_prompt(base)
    out = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        use_cache=False,
        record_prompt=prompt,
        **batch.model_kwargs,
    )
    # left padding: column L-1 is real
    first = out.last_hidden_state[:, -1].repeat_interleave(group_size, 0).unsqueeze(1)  # (N, 1, H)
    steps = completion_ids.shape[1] - 1
    if steps == 0:
        return first
    # Tokens after a row's EOS only ever see the prompt and earlier tokens (causal), so they
    # change nothing where the mask is 1.
    out = body(
        input_ids=completion_ids[:, :-1],
        position_ids=step_positions(next_position.repeat_interleave(group_size), steps, positions),
        use_cache=False,
        shared_prompt=prompt,
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


def _reused_features_hidden(
    base: Any, batch: PromptBatch, completion_ids: Tensor, group_size: int
) -> Tensor:
    """Hidden states (N, T, H) from a full forward, each image encoded once for its group."""
    vision = batch.model_kwargs
    image_inputs: dict[str, Any] = {}
    if "pixel_values" in vision:
        grid = vision["image_grid_thw"]
        features = model_body(base).get_image_features(
            vision["pixel_values"], grid, return_dict=True
        )
        image_inputs["image_grid_thw"] = grid.repeat_interleave(group_size, 0)
        image_inputs["mm_encoder_outputs"] = {"image": _repeat_image_features(features, group_size)}
    return full_sequence_hidden(base, batch, completion_ids, group_size, image_inputs)


def _masked_head_logprobs(
    head: Any,
    hidden: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    temperature: float,
    recompute: bool,
    *,
    entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """LM head + log-probs (and entropies) on the mask-1 positions only, in chunks: (N, T)
    float32 each; the entropies are None unless `entropy`."""
    keep = completion_mask.bool()  # (N, T)
    states = hidden[keep]  # (M, H)
    targets = completion_ids[keep]  # (M,)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
    chunk = max(1, HEAD_CHUNK_ELEMENTS // vocab)

    def score(states_chunk: Tensor, targets_chunk: Tensor) -> Tensor:
        return per_token_logprobs(head(states_chunk), targets_chunk, temperature)

    def score_with_entropy(states_chunk: Tensor, targets_chunk: Tensor) -> tuple[Tensor, Tensor]:
        return logprobs_and_entropy(head(states_chunk), targets_chunk, temperature, entropy_grad)

    scorer = score_with_entropy if entropy else score
    recompute = recompute and torch.is_grad_enabled() and states.shape[0] > chunk
    pieces = []
    for start in range(0, states.shape[0], chunk):
        args = (states[start : start + chunk], targets[start : start + chunk])
        if recompute:
            pieces.append(torch.utils.checkpoint.checkpoint(scorer, *args, use_reentrant=False))
        else:
            pieces.append(scorer(*args))

    def scatter(values: list[Tensor]) -> Tensor:
        flat = torch.cat(values) if values else states.new_zeros(0, dtype=torch.float32)
        return torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device).masked_scatter(
            keep, flat
        )

    if not entropy:
        return scatter(pieces), None
    return scatter([p[0] for p in pieces]), scatter([p[1] for p in pieces])
