"""Records -> the tensors a Qwen-VL forward pass needs, without torchvision.

`PromptEncoder` does what a Qwen-VL processor does, from the tokenizer and the (PIL) image
processor alone: chat template with one image placeholder, image preprocessing, expansion of
`<|image_pad|>` to one token per merged patch, left padding for generation, the attention mask,
and `mm_token_type_ids` (Qwen3-VL's forward refuses images without it; Qwen2.5-VL in
transformers 5 needs it for its 3-D rotary positions). A stock processor cannot be built here:
the Qwen-VL processors construct a video processor that needs torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from safegrpo_pl.core.records import SafetyRecord

IMAGE_PAD = "<|image_pad|>"


@dataclass
class PromptBatch:
    """A batch of prompts ready for `generate`/forward, with the records (labels) beside them.

    Attributes:
        records: the B records, in order (their tags score the completions).
        input_ids: (B, L) token ids, LEFT-padded so every prompt ends at column L-1.
        attention_mask: (B, L) 1 on real tokens, 0 on padding.
        model_kwargs: the rest of what the model's forward needs: `pixel_values`
            (sum of patches, patch_dim), `image_grid_thw` (B, 3), `mm_token_type_ids` (B, L).
    """

    records: list[SafetyRecord]
    input_ids: Tensor
    attention_mask: Tensor
    model_kwargs: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def to(self, device: torch.device | str) -> PromptBatch:
        """Move every tensor to `device` (Lightning calls this to place the batch)."""
        return PromptBatch(
            records=self.records,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            model_kwargs={k: v.to(device) for k, v in self.model_kwargs.items()},
        )

    def select(self, rows: Sequence[int]) -> PromptBatch:
        """The sub-batch of prompts `rows`, with left padding trimmed to the longest of them.

        `pixel_values` holds every image's patches back to back, so it is cut by each image's
        patch count (the product of its `image_grid_thw` row).
        """
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        attention_mask = self.attention_mask.index_select(0, index)
        keep = int(attention_mask.sum(1).max().item())
        kwargs: dict[str, Tensor] = {}
        for key, value in self.model_kwargs.items():
            if key == "pixel_values":
                counts = self.model_kwargs["image_grid_thw"].prod(1).tolist()
                starts = [0]
                for count in counts:
                    starts.append(starts[-1] + int(count))
                kwargs[key] = torch.cat([value[starts[r] : starts[r + 1]] for r in rows])
            elif key == "image_grid_thw":
                kwargs[key] = value.index_select(0, index)
            else:  # per-token tensors: (B, L)
                kwargs[key] = value.index_select(0, index)[:, -keep:]
        return PromptBatch(
            records=[self.records[r] for r in rows],
            input_ids=self.input_ids.index_select(0, index)[:, -keep:],
            attention_mask=attention_mask[:, -keep:],
            model_kwargs=kwargs,
        )

    @staticmethod
    def join(batches: Sequence[PromptBatch], pad_id: int) -> PromptBatch:
        """The prompts of `batches`, in order, left-padded with `pad_id` (masked out) to the
        longest: the inverse of `select` (dynamic sampling joins the groups of several draws).
        """
        width = max(b.input_ids.shape[1] for b in batches)

        def left(x: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        kwargs: dict[str, Tensor] = {}
        for key in batches[0].model_kwargs:
            values = [b.model_kwargs[key] for b in batches]
            per_token = key not in ("pixel_values", "image_grid_thw")  # else: per image
            kwargs[key] = torch.cat([left(v, 0) for v in values] if per_token else values)
        return PromptBatch(
            records=[r for b in batches for r in b.records],
            input_ids=torch.cat([left(b.input_ids, pad_id) for b in batches]),
            attention_mask=torch.cat([left(b.attention_mask, 0) for b in batches]),
            model_kwargs=kwargs,
        )

    @property
    def image_tags(self) -> list[str]:
        return [r.image_tag for r in self.records]

    @property
    def text_tags(self) -> list[str]:
        return [r.text_tag for r in self.records]

    @property
    def combine_tags(self) -> list[str]:
        return [r.combine_tag for r in self.records]


class PromptEncoder:
    """Builds `PromptBatch`es from records for one model family; doubles as a collate function.

    Args:
        tokenizer: the model's tokenizer (with a chat template).
        image_processor: a Qwen2-VL-style image processor; None for a text-only model.
        family: "qwen2_5_vl", "qwen3_vl" or "text" (see `safegrpo_pl.policy.model.model_family`).
        guide: the step-guided safety guide appended to every instruction; None for none.
        system_prompt: an optional system message.
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any = None,
        *,
        family: str,
        guide: str | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if family != "text" and image_processor is None:
            raise ValueError(f"a {family} model needs an image processor; none was given")
        self.tokenizer = tokenizer
        self.image_processor = image_processor if family != "text" else None
        self.family = family
        self.guide = guide
        self.system_prompt = system_prompt
        if self.image_processor is not None and IMAGE_PAD not in tokenizer.get_vocab():
            raise ValueError(
                f"the tokenizer has no {IMAGE_PAD} token: is this a Qwen-VL tokenizer?"
            )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        guide: str | None = "default",
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
    ) -> PromptEncoder:
        """Load the tokenizer and image processor of a checkpoint (hub id, folder or `tiny:`).

        Uses `AutoProcessor` where it constructs (it needs torchvision for Qwen-VL), otherwise the
        tokenizer and the torchvision-free image processor. `guide="default"` means
        `safegrpo_pl.core.prompts.DEFAULT_SAFETY_GUIDE`.
        """
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        from safegrpo_pl.policy.model import load_model_config, model_family
        from safegrpo_pl.policy.tiny_models import resolve_model_path

        if guide == "default":
            from safegrpo_pl.core.prompts import DEFAULT_SAFETY_GUIDE

            guide = DEFAULT_SAFETY_GUIDE
        path = resolve_model_path(name_or_path)
        family = model_family(load_model_config(path, trust_remote_code=trust_remote_code))
        tokenizer, image_processor = None, None
        if family != "text":
            try:
                processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            except (ImportError, AttributeError, OSError, ValueError):
                processor = None  # torchvision missing: build from the parts below
            # AutoProcessor silently returns a bare tokenizer when it cannot build the processor.
            if processor is not None and hasattr(processor, "image_processor"):
                tokenizer, image_processor = processor.tokenizer, processor.image_processor
            else:
                image_processor = AutoImageProcessor.from_pretrained(
                    path, trust_remote_code=trust_remote_code
                )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(
            tokenizer, image_processor, family=family, guide=guide, system_prompt=system_prompt
        )

    # -- text -------------------------------------------------------------------------------

    def prompt_text(self, record: SafetyRecord) -> str:
        """The chat-templated prompt with ONE image placeholder (not yet expanded)."""
        from safegrpo_pl.core.prompts import build_user_text

        user_text = build_user_text(record.prompt, self.guide)
        content: list[dict[str, str]] = []
        if self.image_processor is not None:
            content.append({"type": "image"})
        content.append({"type": "text", "text": user_text})
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _image_tokens(self, grid_thw: Tensor) -> int:
        merge = int(getattr(self.image_processor, "merge_size", 2))
        return int(grid_thw.prod().item()) // (merge * merge)

    def prompt_length(self, record: SafetyRecord) -> int:
        """Number of prompt tokens for `record`, image tokens included (no padding)."""
        text = self.prompt_text(record)
        length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.image_processor is not None:
            self._check_image(record)
            length += self.image_tokens(record.image) - 1  # the placeholder becomes N tokens
        return length

    def image_tokens(self, image: Any) -> int:
        """Visual tokens the language model gets for `image` (merged patches, after resizing)."""
        width, height = image.size
        patches = self.image_processor.get_number_of_image_patches(height, width)
        merge = int(getattr(self.image_processor, "merge_size", 2))
        return patches // (merge * merge)

    def _check_image(self, record: SafetyRecord) -> None:
        if record.image is None:
            raise ValueError(
                f"{record.describe()}: image is missing; a {self.family} model needs one per record"
            )

    # -- tensors ----------------------------------------------------------------------------

    def __call__(self, records: Sequence[SafetyRecord]) -> PromptBatch:
        return self.encode(records)

    def encode(self, records: Sequence[SafetyRecord]) -> PromptBatch:
        """Encode `records` into a left-padded `PromptBatch` (the collate function)."""
        records = list(records)
        if not records:
            raise ValueError("cannot encode an empty batch of records")
        texts = [self.prompt_text(r) for r in records]
        model_kwargs: dict[str, Tensor] = {}
        if self.image_processor is not None:
            for record in records:
                self._check_image(record)
            vision = self.image_processor(images=[r.image for r in records], return_tensors="pt")
            grid = vision["image_grid_thw"]  # (B, 3)
            texts = [
                text.replace(IMAGE_PAD, IMAGE_PAD * self._image_tokens(grid[i]), 1)
                for i, text in enumerate(texts)
            ]
            model_kwargs["pixel_values"] = vision["pixel_values"]
            model_kwargs["image_grid_thw"] = grid
        encoded = self.tokenizer(
            texts,
            padding=True,
            padding_side="left",
            add_special_tokens=False,
            return_tensors="pt",
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        if self.image_processor is not None:
            image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            model_kwargs["mm_token_type_ids"] = (input_ids == image_id).to(torch.int32)
        return PromptBatch(
            records=records,
            input_ids=input_ids,
            attention_mask=attention_mask,
            model_kwargs=model_kwargs,
        )
