"""Tiny random-weight Qwen models built offline, for the tests, the demo and the benchmark.

They are saved as ordinary checkpoint folders, so they travel the same `from_pretrained` path
as a real checkpoint (`safegrpo_pl.policy.model.load_policy`, `PromptEncoder.from_pretrained`):
`build_tiny_model` trains a small byte-level BPE tokenizer with Qwen's special tokens and chat
template, draws a small random Qwen-VL (or Qwen3 text model) and saves both to a folder;
`resolve_model_path("tiny:qwen2_5_vl")` builds such a folder once into the cache and returns
its path.

Choices that differ from a stock Qwen checkpoint:
- The tiny tokenizer has the SafeGRPO format tags (`<think>`, `<visual_safe>`, ...) as single
  added tokens, so completions in the format are short and cheap on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch

from safegrpo_pl.core.files import atomic_folder, default_cache_dir

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
    auto = AutoModelForCausalLM if spec.arch == "qwen3_text" else AutoModelForImageTextToText
    # Seeded on a forked stream: a run must sample the same whether the model was built now or
    # read from the cache, so building leaves the global random state as it found it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
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


def resolve_model_path(name_or_path: str, *, corpus: Sequence[str] = ()) -> str:
    """Turn `tiny:ARCH?opts` into a cached folder (built on first use); anything else is returned.

    The cache key covers the spec, the corpus and the builder version, so a change to any of them
    builds a fresh folder. The folder is published atomically (`files.atomic_folder`), so
    parallel processes (DDP ranks, test workers) never see a half-written model.
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
    with atomic_folder(target, replace=False, complete_marker="tiny_spec.json") as tmp:
        build_tiny_model(tmp, corpus=corpus, spec=spec)
    log.info("built tiny model %s at %s", name_or_path, target)
    return str(target)
