"""Loading the policy: any Qwen2.5-VL / Qwen3-VL checkpoint (hub id or path), LoRA, 4-bit.

Everything is loaded through `from_pretrained`; a `tiny:ARCH?opts` name is first turned into a
cached folder of a tiny random-weight model (`safegrpo_pl.policy.tiny_models`), so the tests and the
demo travel the same code path as a real checkpoint.

The token ids sampling needs come from here too: `eos_token_ids` (every id that ends a
completion) and `vision_token_ids`, the vision special tokens that sampling suppresses: a
random-weight policy would otherwise emit `<|image_pad|>`, which breaks re-scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import AutoConfig, PreTrainedModel

from safegrpo_pl.policy.precision import DTYPES, cast_trainable, dtype_named
from safegrpo_pl.policy.tiny_models import resolve_model_path

VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input (GRPO switches all dropout off: see
            `safegrpo_pl.train.policy_runner`; the supervised warm-up keeps it).
        target_modules: module names or a regex (a single string is a regex for peft).
            The default targets the language model's attention and MLP projections only, not
            the vision tower; "all-linear" targets every linear layer but the output head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | list[str] = (
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        r"|^model\.layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    )
    modules_to_save: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PolicySettings:
    """Which policy to load and how: one typed object for every model-loading choice.

    Attributes:
        name_or_path: hub id, local folder, or `tiny:ARCH?opts` for a tiny offline model.
        dtype: weight dtype of the loaded (frozen) base ("float32", "bfloat16", "float16").
        trainable_dtype: dtype of the weights the optimiser updates, and so of its state
            (float32: updates of 1e-6 survive; see `safegrpo_pl.policy.precision`); null = `dtype`.
            Without LoRA every weight is trainable, so the policy is then float32 and only
            the reference copy stays in `dtype`.
        lora: LoRA adapter settings; null trains all weights (the reference is then a frozen
            copy).
        load_in_4bit: QLoRA: NF4 base weights through bitsandbytes (needs `lora`).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run code shipped with a checkpoint; off unless you opt in.
        attn_implementation: attention kernel ("sdpa", "flash_attention_2", ...); null = auto.
        freeze_vision_tower: train no weight of the vision encoder's blocks; its merger (the
            projection of visual tokens into the language model) stays trainable. A common
            choice when fine-tuning Qwen-VL: the encoder keeps the features it was built with,
            and the step skips its backward pass.
    """

    name_or_path: str = "tiny:qwen2_5_vl"
    dtype: str = "float32"
    trainable_dtype: str | None = "float32"
    lora: LoraSettings | None = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    freeze_vision_tower: bool = False

    def load(self, path: str | None = None) -> PreTrainedModel:
        """`load_policy` with these settings, from `path` (default: `name_or_path`)."""
        return load_policy(
            path or self.name_or_path,
            dtype=self.dtype,
            trainable_dtype=self.trainable_dtype,
            lora=self.lora,
            load_in_4bit=self.load_in_4bit,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
            freeze_vision_tower=self.freeze_vision_tower,
        )


def model_family(config: Any) -> str:
    """ "qwen2_5_vl", "qwen3_vl" (incl. MoE variants) or "text", from a config's model_type."""
    model_type = getattr(config, "model_type", "")
    if model_type in ("qwen2_5_vl", "qwen2_vl"):
        return "qwen2_5_vl"
    if model_type.startswith("qwen3_vl"):
        return "qwen3_vl"
    if getattr(config, "vision_config", None) is not None:
        raise ValueError(
            f"model_type {model_type!r} is a vision-language model this project does not know; "
            "supported: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, or a text-only causal LM"
        )
    return "text"


def _auto_class(config: Any) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForCausalLM if model_family(config) == "text" else AutoModelForImageTextToText


def load_model_config(path: str, *, trust_remote_code: bool = False) -> Any:
    """`AutoConfig.from_pretrained(path)`, failing with one readable `ModelNotFoundError`
    (the config key, what was tried, the alternatives) instead of transformers' chained
    download errors."""
    from safegrpo_pl.core.errors import model_not_found

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise model_not_found(path, err) from err


def load_policy(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trainable_dtype: str | None = None,
    lora: LoraSettings | None = None,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    freeze_vision_tower: bool = False,
) -> PreTrainedModel:
    """Load a policy by hub id or local path, optionally with LoRA and 4-bit weights (QLoRA).

    Args:
        name_or_path: a hub id, a local folder, or `tiny:ARCH?opts` (see `resolve_model_path`).
        dtype: weight dtype name ("float32", "bfloat16", "float16").
        trainable_dtype: dtype name for the trainable weights (after LoRA is applied); None
            leaves them as loaded.
        lora: adapter settings; None trains all weights.
        load_in_4bit: NF4 weights through bitsandbytes (needs `lora`; CUDA in practice).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run code shipped with the checkpoint; off unless you opt in.
        attn_implementation: e.g. "sdpa", "flash_attention_2"; None lets transformers choose.
        freeze_vision_tower: stop training the vision encoder, merger excepted
            (`freeze_vision_encoder`).

    Returns:
        The model (a `peft.PeftModel` when `lora` is given), in train mode.
    """
    dtype_named(dtype)
    if trainable_dtype is not None:
        dtype_named(trainable_dtype, "model.policy.trainable_dtype")
    if load_in_4bit and lora is None:
        raise ValueError("load_in_4bit=True needs LoRA settings: 4-bit weights cannot be trained")
    path = resolve_model_path(name_or_path)
    config = load_model_config(path, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[dtype] if dtype != "float32" else torch.bfloat16,
        )
    model = _auto_class(config).from_pretrained(path, **kwargs)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        # transformers 5.x renamed `gradient_checkpointing_enable`; the old name warns.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.enable_input_require_grads()
    if lora is not None:
        model = apply_lora(model, lora)
    if freeze_vision_tower:
        freeze_vision_encoder(model)
    if trainable_dtype is not None:
        cast_trainable(model, DTYPES[trainable_dtype])
    model.train()
    return model


def is_vision_parameter(name: str, *, merger: bool = True) -> bool:
    """Whether parameter `name` belongs to a Qwen-VL vision tower (`model.visual`); with
    `merger=False`, only to its encoder: the mergers (Qwen3-VL's deepstack ones included) that
    project visual tokens into the language model are left out."""
    parts = name.split(".")
    if "visual" not in parts:
        return False
    return merger or not any("merger" in part for part in parts)


def freeze_vision_encoder(model: Any) -> None:
    """Set `requires_grad=False` on the vision encoder's weights (mergers excepted); a model
    without a vision tower is an error, not a no-op, since the setting would then do nothing."""
    encoder = [p for n, p in model.named_parameters() if is_vision_parameter(n, merger=False)]
    for param in encoder:
        param.requires_grad_(False)
    if not encoder:
        raise ValueError(
            "model.policy.freeze_vision_tower is set, but the model has no vision tower "
            "(no parameter under `visual`); leave it false for a text-only model"
        )


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> Any:
    """Wrap `model` with LoRA adapters; fails clearly when the targets match no module."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(
            f"LoRA target_modules {lora.target_modules!r} match no module of "
            f"{type(model).__name__}: {err}"
        ) from err


def vision_token_ids(tokenizer: Any) -> list[int]:
    """Ids of the vision special tokens present in `tokenizer` (to suppress when sampling)."""
    vocab = tokenizer.get_vocab()
    return sorted(vocab[t] for t in VISION_TOKENS if t in vocab)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids plus `<|im_end|>`."""
    ids: set[int] = set()
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.get_vocab().get(token)
        if token_id is not None:
            ids.add(token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


@dataclass(frozen=True)
class DecodeIds:
    """The token ids every decode of a policy needs, worked out once per loaded model.

    Attributes:
        eos: ids that end a completion (`eos_token_ids`).
        pad: the id that fills a finished row (the tokenizer's pad, else the first EOS id).
        suppress: ids never sampled (`vision_token_ids`).
    """

    eos: list[int]
    pad: int
    suppress: list[int]

    @classmethod
    def of(cls, tokenizer: Any, model: Any = None) -> DecodeIds:
        """The ids for `model` (its generation config's EOS ids count) and its `tokenizer`."""
        eos = eos_token_ids(tokenizer, getattr(model, "generation_config", None))
        pad = tokenizer.pad_token_id
        return cls(
            eos=eos,
            pad=int(pad if pad is not None else eos[0]),
            suppress=vision_token_ids(tokenizer),
        )

    def never_ending(self) -> DecodeIds:
        """These ids with every EOS suppressed too: each completion runs to `max_new_tokens`
        (benchmarks and memory checks measure the longest rollout)."""
        return replace(self, suppress=sorted(set(self.suppress) | set(self.eos)))

    def sampling_kwargs(self) -> dict[str, Any]:
        """These ids as `sampling.sample_groups` takes them."""
        return {
            "eos_token_ids": self.eos,
            "pad_token_id": self.pad,
            "suppress_token_ids": self.suppress,
        }


def build_on_meta(
    config: Any, lora: LoraSettings | None = None, *, freeze_vision_tower: bool = False
) -> Any:
    """Instantiate a model from `config` on the meta device (no memory), LoRA applied and the
    vision encoder frozen if asked, so that its trainable weights are those a fit trains.

    For checking a config (class names, LoRA targets) of a model too large to load here.
    """
    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    if lora is not None:
        model = apply_lora(model, lora)
    if freeze_vision_tower:
        freeze_vision_encoder(model)
    return model
