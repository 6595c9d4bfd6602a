"""Peak GPU memory of a SafeGRPO run, per device, from the model's dimensions and the settings.

Pure arithmetic over two frozen descriptions: `ModelDims` (what the model is: widths, layers,
parameter counts; `model_dims` reads them from a model built on the meta device) and
`RunShape` (what the run does with it: batch sizes, lengths, LoRA, precision, sharding). The
result, `MemoryPlan`, lists the parts in bytes. `safegrpo_pl.plan.cli` reads a `fit` config
into these and prints the plan.

How a step uses memory (the order of `SafeGRPOModule.training_step`):
- resident all along: the policy's weights, the frozen reference copy (full fine-tuning with
  kl_coef > 0), AdamW's two moments (and the float32 master copy where the working weights are
  half precision); under FSDP2 each a shard, the reference in the compute dtype;
- then one of three phases at a time, whose peak is added to the resident part:
  1. sampling, one rollout chunk at a time: the prompt's keys/values at B rows (the decoder
     shares them across a group, `safegrpo_pl.rollout.prefix_attention`), the generated tokens' at
     B*G rows for max_new_tokens (allocated up front), the prefill's transient activations and
     the sampler's (rows, vocab) float buffers; under FSDP2, the whole policy gathered;
  2. the old/reference log-prob passes (no grad), chunked the same way: the prompt's
     keys/values at B rows (the completions share them, `safegrpo_pl.rollout.logprobs`), one
     layer's transient activations with the completions' own keys/values and one tile of
     attention scores, the hidden states and one LM-head chunk;
  3. the training micro-batch (with grad), the prompt once per group: saved activations (all
     of them, or one input per layer, the prompt's recorded keys/values and one recomputed
     layer with gradient checkpointing), the float32 logits kept for
     the log-softmax's backward on every scored token, or one chunk's with `recompute_head`
     (the LM head runs on masked tokens only, `safegrpo_pl.rollout.logprobs`), and the
     gradients.

Assumptions, all on the side of caution:
- every prompt has `prompt_length` tokens (images included) and every completion runs to
  max_new_tokens: the step where no completion ends early is the one that runs out of memory;
- the prompt's attention keeps no (query, key) score matrix (SDPA's flash or memory-efficient
  kernels); keys/values are repeated to all heads where a padding mask is passed (as
  transformers does), and the boolean 4-D padding mask is counted; the completions'
  shared-prefix attention holds one tile of scores at a time;
- bytes per saved tensor follow the Qwen decoder layer as transformers writes it (RMSNorm in
  float32, gated MLP), counted by hand in `_layer_saved_bytes`; the check against measured
  peaks is `scripts/plan_check.py` (within 25% on CPU);
- no allocator fragmentation or CUDA context (leave the margin `plan` asks for: 10% by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from safegrpo_pl.plan.dims import ModelDims

GIB = 2**30
# The LM head's chunk (elements of logits), as in `safegrpo_pl.rollout.logprobs.HEAD_CHUNK_ELEMENTS`.
HEAD_CHUNK_ELEMENTS = 2**26
# One tile of attention scores, as `safegrpo_pl.rollout.prefix_attention.ATTENTION_TILE_ELEMENTS`.
ATTENTION_TILE_ELEMENTS = 2**26
# NF4 with double quantisation: 4 bits per weight plus ~0.127 bits of block scales.
NF4_BYTES = 4.127 / 8
PRECISIONS = ("uniform", "mixed")


@dataclass(frozen=True)
class RunShape:
    """What one device does in a step: the settings of a `fit` config that memory depends on.

    Attributes:
        group_size: completions per prompt (G).
        rollout_batch: prompts per rollout batch on this device (`data.batch_size`).
        mini_batch: prompts per optimiser step (null in the config = the rollout batch).
        micro_batch: prompts per forward/backward (null = the mini-batch).
        rollout_chunk: prompts sampled and scored at once (`model.rollout_micro_batch_size`;
            None = the whole rollout batch).
        prompt_length: prompt tokens, image tokens included (`data.max_prompt_length`).
        completion_length: completion tokens (`model.sampling.max_new_tokens`).
        image_tokens: image tokens per prompt after merging (vision activations under grad).
        lora: LoRA adapters are trained (the reference is the base with adapters off).
        load_in_4bit: NF4 frozen weights.
        gradient_checkpointing: recompute each layer's activations in backward.
        kl_coef_positive: a reference model is scored (kl_coef > 0).
        old_logprobs: the old policy is scored separately (more than one optimiser step per
            rollout batch).
        precision: "uniform" (everything in `dtype_bytes`: bf16-true or 32-true), or "mixed"
            (frozen weights and activations in `dtype_bytes`, trainable weights, their
            gradients and AdamW's state in float32).
        dtype_bytes: bytes of the weight/activation dtype (2 for bf16, 4 for float32).
        world_size: devices in the run.
        shards: the strategy shards weights, gradients, optimiser state and the frozen
            reference over `world_size` devices (FSDP2 through `ModelParallelStrategy`,
            `safegrpo_pl.train.fsdp`); sampling gathers the whole policy for the decode.
        compute_dtype_bytes: bytes of the dtype FSDP2 gathers weights in for compute
            (`model.fsdp_compute_dtype`): activations, caches, gathered weights and the
            reference (cast to it before sharding) use it, the shards `dtype_bytes`. None:
            `dtype_bytes`.
        recompute_head: LM-head logits are recomputed in backward instead of kept.
        repeat_kv: keys/values are repeated to every query head in the attention kernel's input.
        cpu_sampler: float64 uniform draws in the sampler (the CPU path of `exponential_draws`).
    """

    group_size: int
    rollout_batch: int
    mini_batch: int | None
    micro_batch: int | None
    rollout_chunk: int | None
    prompt_length: int
    completion_length: int
    image_tokens: int = 0
    lora: bool = True
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    kl_coef_positive: bool = True
    old_logprobs: bool = False
    precision: str = "uniform"
    dtype_bytes: int = 2
    world_size: int = 1
    shards: bool = False
    compute_dtype_bytes: int | None = None
    recompute_head: bool = True
    repeat_kv: bool = True
    cpu_sampler: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision is {self.precision!r}; expected one of {PRECISIONS}")
        for name in ("group_size", "rollout_batch", "prompt_length", "completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected >= 1")
        sizes = {"mini_batch": self.mini_batch, "micro_batch": self.micro_batch}
        sizes["rollout_chunk"] = self.rollout_chunk
        for name, value in sizes.items():
            if value is not None and not 1 <= value <= self.rollout_batch:
                raise ValueError(
                    f"{name} is {value}; expected 1..{self.rollout_batch} (the rollout batch)"
                )

    @property
    def activation_bytes(self) -> int:
        """Bytes per element of activations, caches and gathered weights."""
        return self.compute_dtype_bytes or self.dtype_bytes

    @property
    def chunk(self) -> int:
        """Prompts sampled and scored at once."""
        return self.rollout_chunk or self.rollout_batch

    @property
    def micro(self) -> int:
        """Prompts per training forward/backward."""
        return self.micro_batch or self.mini_batch or self.rollout_batch


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated bytes per device, part by part.

    Attributes:
        resident: parts held throughout the step (weights, reference, optimiser state).
        phases: for each phase (sampling, log-probs, training), its own parts on top.
    """

    resident: dict[str, float]
    phases: dict[str, dict[str, float]] = field(default_factory=dict)

    def phase_total(self, name: str) -> float:
        """Resident bytes plus the phase's own."""
        return sum(self.resident.values()) + sum(self.phases[name].values())

    @property
    def peak_phase(self) -> str:
        """The phase with the highest total."""
        return max(self.phases, key=self.phase_total)

    @property
    def peak(self) -> float:
        """The estimated peak in bytes."""
        return self.phase_total(self.peak_phase)


def kv_bytes_per_token(dims: ModelDims, dtype_bytes: int) -> int:
    """Keys plus values of one token over all layers (e.g. 144 KiB for Qwen3-VL-8B in bf16)."""
    return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * dtype_bytes


def _layer_saved_bytes(dims: ModelDims, b: int, *, frozen_norms: bool) -> float:
    """Bytes one token leaves saved for backward in one decoder layer.

    Counted from the layer's code: each RMSNorm keeps its input in float32 and two outputs in
    the model dtype (4 + 2b bytes per element; in float32 the input is the tensor itself); the
    attention keeps the rotated query, the attention output and its contiguous copy (o_proj's
    input), plus the query/key norms' input and output on Qwen3; the gated MLP keeps four
    I-wide tensors (gate, up, act(gate), their product). Keys/values are counted apart
    (`_kv_saved_width`): a token's query may see many more keys than its own. With frozen
    norm weights (LoRA), a norm's product with its weight saves the weight, not its input.
    """
    q_width = dims.num_heads * dims.head_dim
    kv_width = dims.num_kv_heads * dims.head_dim
    norms = 2 * dims.hidden_size * (4 + (1 if frozen_norms else 2) * b)
    attn = 3 * q_width * b + 4 * dims.num_heads  # query, output, copy; float32 log-sum-exp
    if dims.qk_norm:
        attn += (4 + b) * (q_width + kv_width)
    mlp = 4 * dims.intermediate_size * b
    return norms + attn + mlp


def _kv_saved_width(dims: ModelDims, run: RunShape) -> int:
    """Elements per token and layer of keys plus values as the attention kernel receives them."""
    heads = dims.num_heads if run.repeat_kv else dims.num_kv_heads
    return 2 * heads * dims.head_dim


def _nograd_layer_bytes(dims: ModelDims, b: int) -> float:
    """Transient bytes per token inside one layer without grad (the MLP's widest moment)."""
    return (3 * dims.intermediate_size + 3 * dims.hidden_size) * b


def _vision_saved_bytes(dims: ModelDims, b: int) -> float:
    """Bytes per vision patch saved for backward over the whole vision tower (approximate)."""
    h, i = dims.vision_hidden_size, dims.vision_intermediate_size
    return dims.vision_layers * (2 * h * (4 + 2 * b) + 6 * h * b + 4 * i * b)


def resident_parts(dims: ModelDims, run: RunShape) -> dict[str, float]:
    """Weights, reference copy and optimiser state: held for the whole step."""
    b = run.dtype_bytes
    frozen = dims.total_params - dims.trainable_params
    if run.load_in_4bit:
        quantised = min(dims.linear_params, frozen)
        frozen_bytes = quantised * NF4_BYTES + (frozen - quantised) * b
    else:
        frozen_bytes = frozen * b
    mixed = run.precision == "mixed"
    trainable_bytes = dims.trainable_params * (4 if mixed else b)
    if mixed and not run.lora and b < 4:  # the half-precision working copy beside the master
        trainable_bytes += dims.trainable_params * b
    moments = dims.trainable_params * 2 * (4 if mixed else b)
    shard = run.world_size if run.shards else 1
    parts = {
        "weights": (frozen_bytes + trainable_bytes) / shard,
        "optimizer state": moments / shard,
    }
    if run.shards and run.world_size > 1:  # one layer gathered, the next prefetched
        parts["sharded-layer gather"] = 2 * dims.layer_params * run.activation_bytes
    if not run.lora and run.kl_coef_positive:
        # a frozen copy; sharded like the policy, in the compute dtype (`fsdp.shard_models`)
        reference = dims.total_params * (run.activation_bytes if run.shards else b)
        parts["reference copy"] = reference / shard
    return parts


def _worst(*moments: dict[str, float]) -> dict[str, float]:
    """The moment (parts alive together) with the most bytes: a phase's peak."""
    return max(moments, key=lambda parts: sum(parts.values()))


def _head_chunk(dims: ModelDims, tokens: int) -> int:
    """Tokens per LM-head chunk (`safegrpo_pl.rollout.logprobs._masked_head_logprobs`)."""
    return max(1, min(HEAD_CHUNK_ELEMENTS // dims.vocab_size, tokens))


def _head_transient(dims: ModelDims, b: int, tokens: int) -> float:
    """One LM-head chunk: logits in the model dtype, their float32 copy, the log-sum-exp's
    float32 temporary (in float32 the copy is the logits themselves)."""
    return _head_chunk(dims, tokens) * dims.vocab_size * (b + (4 if b < 4 else 0) + 4)


def sampling_parts(dims: ModelDims, run: RunShape) -> dict[str, float]:
    """One rollout chunk's sampling: the shared-prefix decode (`safegrpo_pl.rollout.sampling`).

    Two moments: the prefill (prompt cache growing, one layer's activations), then the decode
    (the generated tokens' cache, allocated once for max_new_tokens, and the sampler's buffers).
    """
    b, prompts = run.activation_bytes, run.chunk
    rows = prompts * run.group_size
    kv = kv_bytes_per_token(dims, b)
    prompt_cache = prompts * run.prompt_length * kv
    tokens = prompts * run.prompt_length
    prefill = tokens * (_nograd_layer_bytes(dims, b) + _kv_saved_width(dims, run) * b)
    # decode step: float32 logits, the softmax copy, the exponential draws (float64 uniforms
    # on CPU), and the shared-prefix scores (rows x heads x context, float32, and a softmax)
    sampler = rows * dims.vocab_size * (4 + 4 + (12 if run.cpu_sampler else 4))
    scores = 2 * rows * dims.num_heads * (run.prompt_length + run.completion_length) * 4
    # sharded weights are gathered whole, in the compute dtype, for the whole decode
    gathered = {"gathered weights (decode)": dims.total_params * b} if run.shards else {}
    return _worst(
        {
            **gathered,
            "prompt KV cache (B rows)": prompt_cache,
            "prefill activations": prefill + prompts * run.prompt_length**2,  # + bool mask
        },
        {
            **gathered,
            "prompt KV cache (B rows)": prompt_cache,
            "generated KV cache (B*G rows)": rows * run.completion_length * kv,
            "sampler buffers": sampler + scores + rows * run.completion_length * 8 * 2,
        },
    )


def _attention_tile(dims: ModelDims, rows: int, steps: int, context: int) -> float:
    """One tile of shared-prefix attention scores (`safegrpo_pl.rollout.prefix_attention`):
    float32 scores, their softmax and its gradient at most, each of the tile's elements."""
    elements = min(ATTENTION_TILE_ELEMENTS, rows * dims.num_heads * steps * context)
    return 3 * 4 * elements


def logprob_parts(dims: ModelDims, run: RunShape) -> dict[str, float]:
    """One chunk of the old/reference log-prob passes (no grad, one prompt copy per group).

    Three moments: the prompt's forward (B rows, its keys/values recorded layer by layer),
    the last layer of the completions' forward (the recorded prompt, one layer's activations,
    the rows' own keys/values and one tile of attention scores), then the LM head over the
    hidden states (the prompt's keys/values are gone by then).
    """
    b, prompts = run.activation_bytes, run.chunk
    rows = prompts * run.group_size
    length, steps = run.prompt_length, run.completion_length
    tokens = rows * steps
    kv = kv_bytes_per_token(dims, b)
    prompt_kv = {"prompt KV (B rows, shared by the group)": prompts * length * kv}
    prefill = prompts * length * (_nograd_layer_bytes(dims, b) + _kv_saved_width(dims, run) * b)
    layer = tokens * (_nograd_layer_bytes(dims, b) + kv / dims.num_layers)  # + own keys/values
    hidden = tokens * dims.hidden_size * b
    kept = 2 * tokens * 4 * (1 + run.old_logprobs)  # (N, T) float32 outputs
    return _worst(
        {
            **prompt_kv,
            "prompt activations": prefill + prompts * length**2,  # + bool mask
            "log-probs kept": kept,
        },
        {
            **prompt_kv,
            "layer activations": layer + _attention_tile(dims, rows, steps, length + steps),
            "hidden states": hidden,
            "log-probs kept": kept,
        },
        {
            "hidden states": 2 * hidden,  # (N, T, H) and the masked copy
            "LM head chunk": _head_transient(dims, b, tokens),
            "log-probs kept": kept,
        },
    )


def training_parts(dims: ModelDims, run: RunShape) -> dict[str, float]:
    """One training micro-batch with grad: saved activations, kept logits and gradients.

    The prompt runs once per group (B rows) and the completions attend to its recorded
    keys/values (`safegrpo_pl.rollout.logprobs`), with or without gradient checkpointing.
    Two moments: the end of the forward (every saved tensor and the float32 logits the
    log-softmax keeps for backward), and, with gradient checkpointing, the backward through
    one recomputed layer (the logits are freed by then). Gradients are counted as allocated,
    as they are from the second micro-batch of a mini-batch on.
    """
    b, prompts = run.activation_bytes, run.micro
    rows = prompts * run.group_size
    length, steps = run.prompt_length, run.completion_length
    context, scored = length + steps, rows * steps
    saved = _layer_saved_bytes(dims, b, frozen_norms=run.lora)
    kv_width = _kv_saved_width(dims, run) * b
    kv_layer = kv_bytes_per_token(dims, b) / dims.num_layers
    backward = 2 * (dims.intermediate_size + dims.hidden_size) * b  # gradient temporaries
    shard = run.world_size if run.shards else 1
    grads = dims.trainable_params * (4 if run.precision == "mixed" else run.dtype_bytes) / shard
    kept_rows = _head_chunk(dims, scored) if run.recompute_head else scored
    head = {
        "LM head: float32 logits kept": kept_rows * dims.vocab_size * 4,
        "LM head: chunk transient": _head_transient(dims, b, scored),
        "final norm and head input": scored * dims.hidden_size * (4 + 3 * b),
    }
    grads_parts = {"gradients": grads}
    if run.shards and run.world_size > 1:  # one unit's whole gradient: compute dtype, float32
        grads_parts["layer gradient (reduce-scatter)"] = dims.layer_params * (b + 4)
    vision = {}
    if not run.lora and run.image_tokens:
        patches = 4 * prompts * run.image_tokens  # 2x2 patches merge into one token
        share = dims.vision_layers if run.gradient_checkpointing else 1
        vision["vision activations"] = patches * _vision_saved_bytes(dims, b) / max(share, 1)
    # one layer: the prompt's (its keys/values as its attention kernel gets them, and as
    # recorded for the group) and the completions' (their own keys/values, not the prompt's)
    prompt_layer = prompts * length * (saved + kv_width + kv_layer)
    completion_layer = scored * (saved + kv_layer)
    tile = _attention_tile(dims, rows, steps, context)
    mask = {"attention mask (prompt)": prompts * length**2}
    if not run.gradient_checkpointing:
        saved_parts = {"saved activations": dims.num_layers * (prompt_layer + completion_layer)}
        return {**saved_parts, **mask, **vision, **head, **grads_parts, "attention tile": tile}
    inputs = {
        "checkpointed layer inputs": dims.num_layers
        * (prompts * length + scored)
        * dims.hidden_size
        * b,
        "prompt KV (B rows, recorded)": prompts * length * kv_bytes_per_token(dims, b),
    }
    return _worst(
        {**inputs, **vision, **head, "gradients": grads},
        {
            **inputs,
            **vision,
            "one recomputed layer": prompt_layer + completion_layer + scored * backward,
            "attention tile": tile,
            **mask,
            **grads_parts,
        },
    )


def estimate(dims: ModelDims, run: RunShape) -> MemoryPlan:
    """The per-device memory plan of `run` on a model of `dims`."""
    phases = {"sampling": sampling_parts(dims, run)}
    if run.kl_coef_positive or run.old_logprobs:
        phases["log-probs"] = logprob_parts(dims, run)
    phases["training"] = training_parts(dims, run)
    return MemoryPlan(resident=resident_parts(dims, run), phases=phases)


def fits(plan: MemoryPlan, budget: float, margin: float = 0.1) -> bool:
    """Whether the peak leaves at least `margin` (a fraction) of `budget` bytes free."""
    return plan.peak <= budget * (1 - margin)


def round_gib(value: float) -> float:
    """Bytes to GiB, two decimals (for tables)."""
    return math.floor(value / GIB * 100 + 0.5) / 100
