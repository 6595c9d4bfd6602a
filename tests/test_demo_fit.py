"""scripts/demo_fit.py: right behaviours counted per split, source and held-out kind."""

from __future__ import annotations

import sys
from pathlib import Path

from safegrpo_pl.core.prompts import HELPFUL_ANSWERS, REFUSAL_ANSWERS, format_response
from safegrpo_pl.core.rewards import score_completions
from safegrpo_pl.demo.dataset import DemoConfig, make_demo_splits
from safegrpo_pl.policy.tiny_models import resolve_model_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import demo_fit


def _answer(refuse: bool) -> str:
    answer = REFUSAL_ANSWERS[0] if refuse else HELPFUL_ANSWERS[0]
    return format_response(visual="safe", text="safe", combined="safe", answer=answer)


def test_tally_counts_a_refusal_as_right_only_on_an_unsafe_pair() -> None:
    records = make_demo_splits(DemoConfig(num_train=8, num_val=8, num_test=2))["validation"]
    unsafe = [r.combine_tag == "unsafe" for r in records]
    assert any(unsafe) and not all(unsafe), "the test needs both kinds of pair"
    # Refuse every record: right exactly on the unsafe pairs.
    texts = [_answer(refuse=True) for _ in records]
    parts = score_completions(
        texts,
        [r.image_tag for r in records],
        [r.text_tag for r in records],
        [r.combine_tag for r in records],
    )
    counts = demo_fit.tally("validation", records, parts)
    assert sum(total for _, total in counts.values()) == len(records)
    assert sum(right for right, _ in counts.values()) == sum(unsafe)
    for (split, source, kind), (right, total) in counts.items():
        group = [r for r in records if (r.source, r.novelty) == (source, kind)]
        assert split == "validation" and total == len(group), (source, kind)
        assert right == sum(r.combine_tag == "unsafe" for r in group), (source, kind)


def test_demo_fit_decodes_every_split_and_source_of_a_model() -> None:
    model_dir = resolve_model_path("tiny:qwen2_5_vl?hidden_size=128&num_layers=4")
    demo = DemoConfig(num_train=40, num_val=24, num_test=24)
    counts = demo_fit.demo_fit(model_dir, demo, limit=2)
    splits = {split for split, _, _ in counts}
    sources = {source for _, source, _ in counts}
    assert splits == {"train", "validation", "test"}
    assert sources == {"demo-picture", "demo-typographic"}
    kinds = {kind for split, _, kind in counts if split != "train"}
    assert kinds == {"unseen-pair", "unseen-wording"}
    for (split, source, _), (right, total) in counts.items():
        assert 0 <= right <= total, (split, source)
    for split in splits:
        for source in sources:
            n = sum(t for (s, src, _), (_, t) in counts.items() if (s, src) == (split, source))
            assert n == 2, f"{split}/{source}: {n} records decoded, expected the limit of 2"
