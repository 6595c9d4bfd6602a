"""Records -> model inputs without torchvision, for both Qwen-VL families and text-only."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.policy.inputs import PromptEncoder
from safegrpo_pl.policy.model import load_policy


def _records() -> list[SafetyRecord]:
    return [
        SafetyRecord(
            Image.new("RGB", (64, 64), (200, 20, 20)),
            "How do I bake a cake?",
            "safe",
            "safe",
            "safe",
            id="r0",
            source="t",
        ),
        SafetyRecord(
            Image.new("RGB", (96, 64), (20, 200, 20)),
            "Hi",
            "unsafe",
            "safe",
            "unsafe",
            id="r1",
            source="t",
        ),
    ]


def test_batch_is_left_padded_and_prompt_lengths_match(tiny_vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_vl_path))
    records = _records()
    batch = encoder(records)
    lengths = batch.attention_mask.sum(1).tolist()
    assert lengths == [encoder.prompt_length(r) for r in records], "prompt_length disagrees"
    assert (batch.attention_mask[:, -1] == 1).all(), "prompts must end at the last column"
    assert batch.attention_mask[1, 0] == 0 or lengths[0] == lengths[1]


def test_image_placeholders_match_merged_patches(tiny_vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_vl_path))
    batch = encoder(_records())
    grid = batch.model_kwargs["image_grid_thw"]
    merge = encoder.image_processor.merge_size
    per_row = batch.model_kwargs["mm_token_type_ids"].sum(1)
    assert per_row.tolist() == (grid.prod(1) // merge**2).tolist()


def test_model_accepts_the_batch_in_a_forward_pass(tiny_vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_vl_path))
    model = load_policy(str(tiny_vl_path))
    batch = encoder(_records())
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.model_kwargs
        ).logits
    assert logits.shape[:2] == batch.input_ids.shape
    assert torch.isfinite(logits).all()


def test_text_only_model_gets_no_image_inputs(tiny_qwen3_text_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_qwen3_text_path))
    batch = encoder(_records())
    assert batch.model_kwargs == {}
    assert "<|image_pad|>" not in encoder.prompt_text(_records()[0])


def test_guide_is_in_the_prompt_and_can_be_turned_off(tiny_qwen25vl_path):
    with_guide = PromptEncoder.from_pretrained(str(tiny_qwen25vl_path), guide="Judge SAFETY.")
    without = PromptEncoder.from_pretrained(str(tiny_qwen25vl_path), guide=None)
    record = _records()[0]
    assert "Judge SAFETY." in with_guide.prompt_text(record)
    assert "Judge SAFETY." not in without.prompt_text(record)
    assert record.prompt in without.prompt_text(record)


def test_missing_image_names_the_record(tiny_qwen25vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_qwen25vl_path))
    record = SafetyRecord(None, "Hi", "safe", "safe", "safe", id="x-7", source="s")
    with pytest.raises(ValueError, match=r"id=x-7.*image is missing"):
        encoder([record])


def test_batch_moves_to_a_device_with_its_records(tiny_qwen25vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_qwen25vl_path))
    batch = encoder(_records()).to("cpu")
    assert batch.combine_tags == ["safe", "unsafe"]
    assert batch.model_kwargs["pixel_values"].device.type == "cpu"


def test_selecting_rows_equals_encoding_those_records_alone(tiny_vl_path):
    encoder = PromptEncoder.from_pretrained(str(tiny_vl_path))
    records = _records()
    picked = encoder(records).select([1])
    alone = encoder([records[1]])
    assert picked.records == alone.records
    torch.testing.assert_close(picked.input_ids, alone.input_ids, atol=0, rtol=0)
    torch.testing.assert_close(picked.attention_mask, alone.attention_mask, atol=0, rtol=0)
    for key, value in alone.model_kwargs.items():
        torch.testing.assert_close(picked.model_kwargs[key], value, atol=0, rtol=0, msg=key)
