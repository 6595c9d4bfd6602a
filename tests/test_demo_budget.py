"""The demo's visual-token budget, measured with the demo model's own image processor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from safegrpo_pl.demo_data import SOURCE_PICTURE, SOURCE_TYPOGRAPHIC, DemoConfig, make_demo_splits
from safegrpo_pl.inputs import IMAGE_PAD

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_budget  # noqa: E402


@pytest.fixture(scope="module")
def budget() -> dict[str, dict[str, object]]:
    return {row["source"]: row for row in demo_budget.measure(ROOT / "configs" / "tiny.yaml")}


def test_typographic_images_get_sixteen_visual_tokens(budget) -> None:
    # 112 px -> 4x4 merged tokens of 28x28 px; pictures stay at 64 px -> 2x2 tokens.
    assert budget[SOURCE_TYPOGRAPHIC]["visual_tokens"] == 16, budget
    assert budget[SOURCE_PICTURE]["visual_tokens"] == 4, budget


def test_counted_tokens_are_the_tokens_the_model_gets() -> None:
    # The count the budget reports must equal the image placeholders actually encoded.
    import yaml

    from safegrpo_pl.inputs import PromptEncoder

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    encoder = PromptEncoder.from_pretrained(config["model"]["policy"]["name_or_path"], guide=None)
    records = make_demo_splits(DemoConfig(num_train=40, num_val=0, num_test=0))["train"]
    pad = encoder.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for source in (SOURCE_PICTURE, SOURCE_TYPOGRAPHIC):
        record = next(r for r in records if r.source == source)
        batch = encoder.encode([record])
        encoded = int((batch.input_ids == pad).sum())
        assert encoded == encoder.image_tokens(record.image), f"{source}: count disagrees"
        assert int(batch.attention_mask.sum()) == encoder.prompt_length(record), source
