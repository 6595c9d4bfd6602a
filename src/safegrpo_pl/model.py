"""Loading the policy: any Qwen2.5-VL / Qwen3-VL checkpoint (hub id or path), LoRA, 4-bit, and
tiny random-weight models built offline.

Everything is loaded through `from_pretrained`, so the tiny models used by the tests and the demo
travel the same code path as a real checkpoint: `build_tiny_model` trains a small byte-level BPE
tokenizer with Qwen's special tokens and chat template, draws a small random Qwen-VL, and saves
both to a folder; `resolve_model_path("tiny:qwen2_5_vl")` builds such a folder once into a cache
and returns its path.

Choices that differ from a stock Qwen checkpoint (tiny models only):
- The tiny tokenizer has the SafeGRPO format tags (`<think>`, `<visual_safe>`, ...) as single
  added tokens, so completions in the format are short and cheap on a CPU.
- Vision special tokens are listed by `vision_token_ids` so that sampling can suppress them: a
  random-weight policy would otherwise emit `<|image_pad|>`, which breaks re-scoring.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from transformers import AutoConfig, PreTrainedModel

log = logging.getLogger(__name__)

# The special tokens of the Qwen2.5-VL / Qwen3-VL tokenizers that a tiny model needs.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_TOKENS: tuple[str, ...] = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added as ordinary (non-special) tokens so they survive `skip_special_tokens` decoding.
FORMAT_TOKENS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "<visual_safe>",
    "</visual_safe>",
    "<text_safe>",
    "</text_safe>",
    "<combined_safe>",
    "</combined_safe>",
)

# A chat template in the Qwen-VL convention (our own wording of it): an image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, which the input encoder expands to the number of
# merged patches.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

# Words a tokenizer trained for the demo should know, beside the corpus it is given.
_BASE_CORPUS: tuple[str, ...] = (
    "You are a helpful assistant. Describe the image. The image shows a picture.",
    "safe unsafe safe unsafe The request is safe. The request is unsafe.",
    "Sorry, I cannot help with that because it could cause harm. I refuse.",
    "Sure, here is a helpful answer. Here is what you asked for.",
    "The instruction asks for something. The combination of image and text implies harm.",
)

TINY_BUILDER_VERSION = 1  # bump when build_tiny_model's output changes, to refresh caches


@dataclass(frozen=True)
class TinyModelSpec:
    """Sizes of a tiny random-weight model (defaults: fast enough for unit tests on 2 cores).

    Attributes:
        arch: "qwen2_5_vl", "qwen3_vl" or "qwen3_text" (text-only, for the TRL comparison).
        hidden_size: width of the language model.
        num_layers: number of decoder layers.
        num_heads: attention heads (key/value heads are half of them).
        vision_hidden_size: width of the vision tower.
        vision_depth: number of vision blocks.
        vocab_size: target size of the trained BPE vocabulary (special tokens included).
        seed: seed of the random weights.
    """

    arch: str = "qwen2_5_vl"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vocab_size: int = 1024
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> TinyModelSpec:
        """Parse `tiny:ARCH?key=value&...`, e.g. `tiny:qwen2_5_vl?hidden_size=128&num_layers=4`."""
        body = spec.removeprefix("tiny:")
        arch, _, query = body.partition("?")
        known = {f for f in cls.__dataclass_fields__ if f != "arch"}
        kwargs: dict[str, Any] = {}
        for key, value in parse_qsl(query, strict_parsing=bool(query)):
            if key not in known:
                raise ValueError(
                    f"{spec!r}: unknown tiny-model option {key!r}; known: {sorted(known)}"
                )
            kwargs[key] = int(value)
        return cls(arch=arch or "qwen2_5_vl", **kwargs)


def build_tiny_tokenizer(corpus: Iterable[str] = (), vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on `corpus` and wrap it as a Qwen tokenizer with a chat template.

    Offline and deterministic: the same corpus gives the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    texts = list(_BASE_CORPUS) + list(corpus)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS) - len(FORMAT_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    vocab = dict(state["vocab"])
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_tokens([AddedToken(t, special=True) for t in QWEN_SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def _tiny_config(spec: TinyModelSpec, tokenizer: Any) -> Any:
    """The model config for `spec`, with token ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen3Config, Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 2 // 4  # mrope splits head_dim/2 rotary frequencies over (t, h, w)
    text: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=max(1, spec.num_heads // 2),
        max_position_embeddings=8192,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision: dict[str, Any] = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        intermediate_size=2 * spec.vision_hidden_size,
        num_heads=max(1, spec.vision_hidden_size // 16),
        out_hidden_size=spec.hidden_size,
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if spec.arch == "qwen2_5_vl":
        section = [head_dim // 2 - 2 * quarter, quarter, quarter]
        text["rope_parameters"] = {
            "rope_type": "default",
            "mrope_section": section,
            "rope_theta": 10000.0,
        }
        vision.update(fullatt_block_indexes=[spec.vision_depth - 1], window_size=112)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if spec.arch == "qwen3_vl":
        section = [head_dim // 2 - 2 * quarter, quarter, quarter]
        text.update(
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": section,
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        )
        vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    if spec.arch == "qwen3_text":
        text.update(head_dim=head_dim, tie_word_embeddings=False)
        return Qwen3Config(**text)
    raise ValueError(
        f"unknown tiny architecture {spec.arch!r}; expected one of "
        "'qwen2_5_vl', 'qwen3_vl', 'qwen3_text'"
    )


def _tiny_image_processor(arch: str) -> Any:
    """A torchvision-free image processor with the patch geometry of `arch`."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if arch == "qwen3_vl":  # Qwen3-VL: 16-pixel patches, mean/std 0.5
        return Qwen2VLImageProcessorPil(
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            min_pixels=32 * 32,
            max_pixels=256 * 256,
        )
    return Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=28 * 28, max_pixels=224 * 224
    )


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: str = "qwen2_5_vl",
    *,
    corpus: Sequence[str] = (),
    spec: TinyModelSpec | None = None,
) -> Path:
    """Save a tiny random-weight Qwen model, its tokenizer and image processor to `out_dir`.

    The folder is then loaded like any checkpoint (`load_policy(out_dir)`,
    `PromptEncoder.from_pretrained(out_dir)`), so tests exercise the real loading path.

    Args:
        out_dir: folder to write (created; existing files are overwritten).
        arch: "qwen2_5_vl", "qwen3_vl" or "qwen3_text"; ignored when `spec` is given.
        corpus: extra texts for the tokenizer, so that prompts tokenize compactly.
        spec: sizes; defaults to `TinyModelSpec(arch=arch)`.

    Returns:
        The folder's path.
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

    spec = spec or TinyModelSpec(arch=arch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(corpus, vocab_size=spec.vocab_size)
    config = _tiny_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    auto = AutoModelForCausalLM if spec.arch == "qwen3_text" else AutoModelForImageTextToText
    model = auto.from_config(config)
    eos = [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]
    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=eos[1], do_sample=True, temperature=1.0, top_p=1.0, top_k=0
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if spec.arch != "qwen3_text":
        _tiny_image_processor(spec.arch).save_pretrained(out)
    (out / "tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out


def default_cache_dir() -> Path:
    """Where `tiny:` models are built: `$SAFEGRPO_CACHE` or `~/.cache/safegrpo_pl`."""
    return Path(os.environ.get("SAFEGRPO_CACHE", Path.home() / ".cache" / "safegrpo_pl"))


def resolve_model_path(name_or_path: str, *, corpus: Sequence[str] = ()) -> str:
    """Turn `tiny:ARCH?opts` into a cached folder (built on first use); anything else is returned.

    The cache key covers the spec, the corpus and the builder version, so a change to any of them
    builds a fresh folder. The build goes to a temporary folder renamed into place, so parallel
    processes (DDP ranks, test workers) never see a half-written model.
    """
    if not name_or_path.startswith("tiny:"):
        return name_or_path
    spec = TinyModelSpec.parse(name_or_path)
    key = hashlib.sha256(
        json.dumps([asdict(spec), list(corpus), TINY_BUILDER_VERSION]).encode()
    ).hexdigest()[:16]
    target = default_cache_dir() / "tiny" / f"{spec.arch}-{key}"
    if (target / "tiny_spec.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build_tiny_model(tmp, corpus=corpus, spec=spec)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            if not (target / "tiny_spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built tiny model %s at %s", name_or_path, target)
    return str(target)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapter's input.
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
        dtype: weight dtype ("float32", "bfloat16", "float16").
        lora: LoRA adapter settings; null trains all weights (the reference is then a frozen
            copy).
        load_in_4bit: QLoRA: NF4 base weights through bitsandbytes (needs `lora`).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run code shipped with a checkpoint; off unless you opt in.
        attn_implementation: attention kernel ("sdpa", "flash_attention_2", ...); null = auto.
    """

    name_or_path: str = "tiny:qwen2_5_vl"
    dtype: str = "float32"
    lora: LoraSettings | None = None
    load_in_4bit: bool = False
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    def load(self, path: str | None = None) -> PreTrainedModel:
        """`load_policy` with these settings, from `path` (default: `name_or_path`)."""
        return load_policy(
            path or self.name_or_path,
            dtype=self.dtype,
            lora=self.lora,
            load_in_4bit=self.load_in_4bit,
            gradient_checkpointing=self.gradient_checkpointing,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


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


def load_policy(
    name_or_path: str,
    *,
    dtype: str = "float32",
    lora: LoraSettings | None = None,
    load_in_4bit: bool = False,
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """Load a policy by hub id or local path, optionally with LoRA and 4-bit weights (QLoRA).

    Args:
        name_or_path: a hub id, a local folder, or `tiny:ARCH?opts` (see `resolve_model_path`).
        dtype: weight dtype name ("float32", "bfloat16", "float16").
        lora: adapter settings; None trains all weights.
        load_in_4bit: NF4 weights through bitsandbytes (needs `lora`; CUDA in practice).
        gradient_checkpointing: recompute activations in backward to save memory.
        trust_remote_code: run code shipped with the checkpoint; off unless you opt in.
        attn_implementation: e.g. "sdpa", "flash_attention_2"; None lets transformers choose.

    Returns:
        The model (a `peft.PeftModel` when `lora` is given), in train mode.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if load_in_4bit and lora is None:
        raise ValueError("load_in_4bit=True needs LoRA settings: 4-bit weights cannot be trained")
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
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
    model.train()
    return model


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


def build_on_meta(config: Any, lora: LoraSettings | None = None) -> Any:
    """Instantiate a model from `config` on the meta device (no memory), LoRA applied if given.

    For checking a config (class names, LoRA targets) of a model too large to load here.
    """
    with torch.device("meta"):
        model = _auto_class(config).from_config(config)
    if lora is not None:
        model = apply_lora(model, lora)
    return model
