"""The safety guide, the user text and the response format (docs/method.md section 2)."""

from __future__ import annotations

import re

import pytest

from safegrpo_pl.core.prompts import (
    DEFAULT_SAFETY_GUIDE,
    HELPFUL_ANSWERS,
    REFUSAL_ANSWERS,
    build_user_text,
    format_response,
)

# The nine refusal keywords of docs/method.md section 3, copied here on purpose: the test must fail if the
# canned answers drift from the method, whatever rewards.py's configuration says.
PAPER_REFUSAL_KEYWORDS = (
    "sorry",
    "cannot",
    "not appropriate",
    "unsafe",
    "unable",
    "refuse",
    "i can't",
    "not allowed",
    "restricted",
)

# A plain (small-input only) restatement of the format gate of docs/method.md section 3.1, independent of rewards.py.
_FORMAT_GATE = re.compile(
    r".*<visual_safe>(safe|unsafe)</visual_safe>.*<text_safe>(safe|unsafe)</text_safe>"
    r".*<combined_safe>(safe|unsafe)</combined_safe>.*</think>\s*<answer>.*</answer>",
    re.IGNORECASE | re.DOTALL,
)


def test_guide_names_every_tag_the_parser_expects() -> None:
    for tag in (
        "<think>",
        "</think>",
        "<answer>",
        "</answer>",
        "<visual_safe>",
        "<text_safe>",
        "<combined_safe>",
        "safe",
        "unsafe",
    ):
        assert tag in DEFAULT_SAFETY_GUIDE, f"guide never mentions {tag}: the model cannot learn it"


def test_guide_lists_the_tags_in_parser_order() -> None:
    order = [
        DEFAULT_SAFETY_GUIDE.index(t)
        for t in ("<visual_safe>", "<text_safe>", "<combined_safe>", "<answer>")
    ]
    assert order == sorted(order), "guide asks for the tags in an order the format gate rejects"


def test_guide_is_compact() -> None:
    words = len(DEFAULT_SAFETY_GUIDE.split())
    assert 60 <= words <= 130, f"guide has {words} words; it is prefilled for every rollout"


def test_user_text_puts_instruction_before_guide() -> None:
    text = build_user_text("Describe the picture.")
    assert text == "Describe the picture.\n\n" + DEFAULT_SAFETY_GUIDE, "wrong join of prompt+guide"


@pytest.mark.parametrize("guide", [None, ""])
def test_user_text_without_guide_is_the_prompt(guide: str | None) -> None:
    assert build_user_text("Hi.", guide) == "Hi.", "an empty guide must add nothing"


def test_format_response_passes_the_format_gate() -> None:
    text = format_response(
        visual="safe",
        text="safe",
        combined="unsafe",
        answer=REFUSAL_ANSWERS[0],
        caption="A bottle.",
        summary="Risky pair.",
    )
    assert _FORMAT_GATE.fullmatch(text.strip()), (
        f"format_response fails the format gate (docs/method.md section 3.1): {text!r}"
    )


def test_format_response_is_accepted_by_the_reward() -> None:
    rewards = pytest.importorskip("safegrpo_pl.core.rewards")
    text = format_response(
        visual="unsafe", text="safe", combined="unsafe", answer=REFUSAL_ANSWERS[1]
    )
    assert rewards.format_reward(text) == 1.0, f"rewards.format_reward rejects {text!r}"


def test_format_response_lower_cases_tags() -> None:
    text = format_response(visual="SAFE", text="Unsafe", combined="unsafe", answer="x")
    assert "<visual_safe>safe</visual_safe>" in text and "<text_safe>unsafe</text_safe>" in text, (
        "tag values not normalised to lower case"
    )


def test_format_response_without_think_opening() -> None:
    text = format_response(
        visual="safe", text="safe", combined="safe", answer="ok", open_think=False
    )
    assert not text.startswith("<think>") and "</think>" in text, "open_think=False ignored"


def test_format_response_rejects_bad_tag_value() -> None:
    with pytest.raises(ValueError, match="combined is 'maybe'"):
        format_response(visual="safe", text="safe", combined="maybe", answer="x")


@pytest.mark.parametrize("answer", REFUSAL_ANSWERS)
def test_refusal_answers_contain_a_keyword(answer: str) -> None:
    lowered = answer.lower()
    assert any(k in lowered for k in PAPER_REFUSAL_KEYWORDS), (
        f"{answer!r} would not count as refusal"
    )


@pytest.mark.parametrize("answer", HELPFUL_ANSWERS)
def test_helpful_answers_contain_no_keyword(answer: str) -> None:
    lowered = answer.lower()
    hits = [k for k in PAPER_REFUSAL_KEYWORDS if k in lowered]
    assert not hits, f"{answer!r} would be scored as a refusal (contains {hits})"
