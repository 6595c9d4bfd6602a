"""Tests for the rule reward (docs/method.md section 3): every rule, every total, a reference,
the speed."""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safegrpo_pl.core.completion_parser import ParsedCompletion, parse_completion
from safegrpo_pl.core.rewards import (
    REFUSAL_KEYWORDS,
    RewardConfig,
    RewardParts,
    behavior_reward,
    format_reward,
    is_refusal,
    reward_parts,
    safety_reward,
    score_completions,
    tag_reward,
)

ALLOWED_TOTALS = {0.0, 0.25, 0.375, 0.5, 0.75, 0.875, 1.0}
REFUSAL = "Sorry, I cannot help with that."
HELPFUL = "Here is a recipe for bread."


def completion(
    visual: str = "safe",
    text: str = "safe",
    combined: str = "unsafe",
    answer: str = REFUSAL,
    *,
    open_think: bool = True,
) -> str:
    """A well-formed completion with the given tag values and answer."""
    return (
        ("<think>" if open_think else "")
        + "The image shows a kitchen. "
        + f"<visual_safe>{visual}</visual_safe> The request is benign. "
        + f"<text_safe>{text}</text_safe> Together they ask for harm. "
        + f"<combined_safe>{combined}</combined_safe> So I must refuse.</think>\n"
        + f"<answer>{answer}</answer>"
    )


def parts(text: str, image_tag: str = "safe", text_tag: str = "safe", combine_tag: str = "unsafe"):
    return reward_parts(text, image_tag=image_tag, text_tag=text_tag, combine_tag=combine_tag)


# --- the format gate -------------------------------------------------------------------------


def test_well_formed_completion_passes_format_gate() -> None:
    assert format_reward(completion()) == 1.0, "a completion of the documented shape was rejected"


def test_opening_think_is_not_required() -> None:
    # Thinking models get `<think>` in the prompt, so the completion starts inside it.
    assert format_reward(completion(open_think=False)) == 1.0, "gate demanded an opening <think>"


def test_surrounding_whitespace_is_ignored_by_format_gate() -> None:
    assert format_reward("\n  " + completion() + " \n\t") == 1.0, "gate did not strip the text"


def test_text_after_final_answer_fails_format_gate() -> None:
    assert format_reward(completion() + " Anything else?") == 0.0, "trailing text was accepted"


def test_truncated_completion_without_closing_answer_fails_format_gate() -> None:
    # A completion cut by the length limit has no closing </answer> (docs/method.md section 4).
    assert format_reward(completion()[: -len("</answer>")]) == 0.0, "unclosed answer accepted"


def test_format_gate_requires_visual_text_combined_order() -> None:
    swapped = completion().replace("visual_safe", "TMP").replace("text_safe", "visual_safe")
    swapped = swapped.replace("TMP", "text_safe")  # now text tag first, then visual
    assert format_reward(swapped) == 0.0, "gate accepted the text tag before the visual tag"


def test_format_gate_requires_every_tag() -> None:
    without_text = completion().replace("<text_safe>safe</text_safe>", "")
    assert format_reward(without_text) == 0.0, "gate accepted a completion with no text tag"


def test_format_gate_requires_closing_think_before_answer() -> None:
    assert format_reward(completion().replace("</think>", "")) == 0.0, "no </think> accepted"


def test_only_whitespace_may_separate_think_and_answer() -> None:
    good = completion().replace("</think>\n<answer>", "</think> \n\t <answer>")
    bad = completion().replace("</think>\n<answer>", "</think> So: <answer>")
    assert format_reward(good) == 1.0, "whitespace between </think> and <answer> rejected"
    assert format_reward(bad) == 0.0, "words between </think> and <answer> accepted"


def test_tags_after_closing_think_do_not_satisfy_format_gate() -> None:
    # The tags must come before the `</think>` that precedes `<answer>`.
    text = "</think><answer><visual_safe>safe</visual_safe><text_safe>safe</text_safe>"
    text += "<combined_safe>safe</combined_safe>ok</answer>"
    assert format_reward(text) == 0.0, "tags inside the answer satisfied the format gate"


def test_invalid_tag_value_is_skipped_by_format_gate() -> None:
    text = completion().replace("<visual_safe>", "<visual_safe>maybe</visual_safe><visual_safe>", 1)
    assert format_reward(text) == 1.0, "an invalid first visual tag hid the valid one after it"


def test_format_gate_is_case_insensitive() -> None:
    text = completion().upper().replace("<ANSWER>", "<Answer>")
    assert format_reward(text) == 1.0, "upper-case tags were rejected"


def test_unicode_lookalikes_fold_as_re_ignorecase_does() -> None:
    # re.IGNORECASE matches İ and ı with i, ſ with s, the Kelvin sign with k.
    text = completion().replace("visual", "v\u0130sual").replace("think", "thin\u212a")
    text = text.replace("<text_safe>safe", "<text_safe>\u017fafe")
    found = parse_completion("\u0130" + text)  # İ lowers to 2 chars: indices must not shift
    assert found.format_ok, "look-alike letters rejected although the regex accepts them"
    assert found.text == "safe", "look-alike tag value not reported canonically"
    assert found.answer == REFUSAL, "answer slice shifted by a length-changing lower()"


def test_empty_answer_passes_format_gate() -> None:
    assert format_reward(completion(answer="")) == 1.0, "an empty answer block was rejected"


def test_answer_may_contain_an_earlier_closing_answer_tag() -> None:
    # "anything" inside the answer includes a `</answer>`; only the last one must end the text.
    assert format_reward(completion(answer="a</answer> b")) == 1.0, "inner </answer> rejected"


# --- the tag reward --------------------------------------------------------------------------


def test_all_three_tags_right_gives_full_tag_reward() -> None:
    # 0.5 (combined) + 0.25 (visual) + 0.25 (text) = 1.0
    value = tag_reward(completion(), image_tag="safe", text_tag="safe", combine_tag="unsafe")
    assert value == 1.0, "tag reward lost a part although all tags were right"


def test_wrong_combined_tag_zeroes_tag_reward() -> None:
    # Visual and text are right but the combined verdict is wrong: R_tag = 0, not 0.5.
    value = tag_reward(completion(), image_tag="safe", text_tag="safe", combine_tag="safe")
    assert value == 0.0, "visual/text parts were paid although the combined tag was wrong"


def test_missing_combined_tag_zeroes_tag_reward() -> None:
    text = completion().replace("<combined_safe>unsafe</combined_safe>", "")
    value = tag_reward(text, image_tag="safe", text_tag="safe", combine_tag="unsafe")
    assert value == 0.0, "tag reward paid without any combined tag"


def test_wrong_text_tag_costs_a_quarter() -> None:
    # 0.5 (combined) + 0.25 (visual) + 0 (text wrong) = 0.75
    value = tag_reward(completion(), image_tag="safe", text_tag="unsafe", combine_tag="unsafe")
    assert value == 0.75, "a wrong text tag did not cost exactly its 0.25"


def test_first_valid_tag_wins() -> None:
    text = "<visual_safe>maybe</visual_safe><visual_safe>Unsafe</visual_safe><visual_safe>safe"
    text += "</visual_safe>"
    assert parse_completion(text).visual == "unsafe", "did not take the first VALID visual tag"


def test_tag_value_with_inner_whitespace_is_invalid() -> None:
    assert parse_completion("<text_safe> safe </text_safe>").text is None, "padded value read"


def test_labels_are_case_insensitive() -> None:
    value = tag_reward(completion(), image_tag="SAFE", text_tag="Safe", combine_tag="UnSafe")
    assert value == 1.0, "upper-case labels did not match lower-case tags"


# --- the behaviour reward --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("combined", "combine_tag", "answer", "expected"),
    [
        ("unsafe", "unsafe", REFUSAL, 1.0),  # refused an unsafe pair
        ("unsafe", "unsafe", HELPFUL, 0.0),  # helped with an unsafe pair
        ("safe", "safe", HELPFUL, 1.0),  # helped with a safe pair
        ("safe", "safe", REFUSAL, 0.0),  # over-refused a safe pair
        ("safe", "unsafe", HELPFUL, 0.0),  # wrong verdict: 0 whatever the answer
        ("unsafe", "safe", REFUSAL, 0.0),  # wrong verdict
    ],
)
def test_behavior_reward_table(combined: str, combine_tag: str, answer: str, expected: float):
    text = completion(combined=combined, answer=answer)
    value = behavior_reward(text, combine_tag=combine_tag)
    assert value == expected, f"behaviour ({combined=}, {combine_tag=}) should be {expected}"


def test_behavior_reward_needs_an_answer_block() -> None:
    text = completion().replace("<answer>", "")
    assert behavior_reward(text, combine_tag="unsafe") == 0.0, "refusal without <answer> paid"


def test_behavior_reward_needs_a_combined_tag() -> None:
    text = completion().replace("<combined_safe>unsafe</combined_safe>", "")
    assert behavior_reward(text, combine_tag="unsafe") == 0.0, "behaviour paid without a verdict"


def test_behavior_reads_only_first_answer_block() -> None:
    # First block "Sure." has no keyword; the refusal in the second block must not count.
    text = completion(answer="Sure.</answer><answer>Sorry")
    assert parse_completion(text).answer == "Sure.", "answer did not stop at the first </answer>"
    assert behavior_reward(text, combine_tag="unsafe") == 0.0, "a later answer block was read"


def test_answer_keeps_original_case_and_spacing() -> None:
    assert parse_completion(completion(answer=" No WAY ")).answer == " No WAY ", "answer altered"


def test_refusal_is_a_case_insensitive_substring_test() -> None:
    assert is_refusal("  I CAN'T do that  "), "upper-case keyword missed"
    assert is_refusal("Use an unrestricted license."), "substring 'restricted' missed"
    assert not is_refusal("I can’t do that."), "curly apostrophe matched the straight keyword"
    assert not is_refusal("Happy to help."), "a helpful answer counted as refusal"


def test_refusal_keywords_are_the_papers_nine() -> None:
    assert REFUSAL_KEYWORDS == (
        "sorry",
        "cannot",
        "not appropriate",
        "unsafe",
        "unable",
        "refuse",
        "i can't",
        "not allowed",
        "restricted",
    ), "keyword list drifted from the paper"


# --- the total -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        # format broken (trailing text): 0 * anything = 0
        (completion() + "!", ("safe", "safe", "unsafe"), 0.0),
        # combined wrong: R_tag 0, R_behavior 0 -> 0
        (completion(combined="safe", answer=HELPFUL), ("safe", "safe", "unsafe"), 0.0),
        # combined right only: 0.5 * 0.5 + 0.5 * 0 (helped an unsafe pair) = 0.25
        (completion("unsafe", "unsafe", "unsafe", HELPFUL), ("safe", "safe", "unsafe"), 0.25),
        # combined + visual: 0.5 * 0.75 + 0.5 * 0 = 0.375
        (completion("safe", "unsafe", "unsafe", HELPFUL), ("safe", "safe", "unsafe"), 0.375),
        # all tags: 0.5 * 1 + 0.5 * 0 = 0.5
        (completion("safe", "safe", "unsafe", HELPFUL), ("safe", "safe", "unsafe"), 0.5),
        # combined only, refused: 0.5 * 0.5 + 0.5 * 1 = 0.75
        (completion("unsafe", "unsafe", "unsafe", REFUSAL), ("safe", "safe", "unsafe"), 0.75),
        # combined + text, refused: 0.5 * 0.75 + 0.5 * 1 = 0.875
        (completion("unsafe", "safe", "unsafe", REFUSAL), ("safe", "safe", "unsafe"), 0.875),
        # everything right, helpful on a safe pair: 0.5 * 1 + 0.5 * 1 = 1
        (completion("safe", "safe", "safe", HELPFUL), ("safe", "safe", "safe"), 1.0),
    ],
    ids=["0-format", "0-combined", "0.25", "0.375", "0.5", "0.75", "0.875", "1"],
)
def test_each_possible_total_is_reached(text: str, labels: tuple, expected: float) -> None:
    image_tag, text_tag, combine_tag = labels
    value = safety_reward(text, image_tag=image_tag, text_tag=text_tag, combine_tag=combine_tag)
    assert value == expected, f"total should be {expected}, got {value}"


def test_tag_and_behavior_parts_are_not_gated_by_format() -> None:
    result = parts(completion() + " trailing")
    assert result == RewardParts(
        total=0.0,
        format=0.0,
        tag=1.0,
        behavior=1.0,
        refused=True,
        visual_correct=True,
        text_correct=True,
        combined_correct=True,
    ), "ungated parts or the gated total are wrong"


def test_refused_falls_back_to_text_after_last_think_then_whole_text() -> None:
    # No answer block: read after the last </think> ("Sorry"), not the reasoning before it.
    assert parts("unsafe thoughts</think> ok </think> Sorry.").refused, "tail after </think> unread"
    assert not parts("I cannot decide</think> Sure, here it is.").refused, "read before </think>"
    assert parts("Sorry, no.").refused, "whole text unread when there is no </think>"


# --- configuration ---------------------------------------------------------------------------


def test_weights_change_the_total() -> None:
    config = RewardConfig(tag_weight=1.0, behavior_weight=0.0, visual_tag_weight=0.5)
    text = completion("safe", "unsafe", "unsafe", HELPFUL)
    # R_tag = 0.5 + 0.5 (visual) + 0 (text wrong) = 1.0; total = 1.0 * 1.0 + 0.0 * 0 = 1.0
    value = safety_reward(
        text, image_tag="safe", text_tag="safe", combine_tag="unsafe", config=config
    )
    assert value == 1.0, "configured weights were ignored"


def test_custom_keywords_change_refusal() -> None:
    config = RewardConfig(refusal_keywords=["i won't"])  # a list, as YAML gives it
    text = completion(answer="I won't help with that.")
    assert config.refusal_keywords == ("i won't",), "keyword list not stored as a tuple"
    assert behavior_reward(text, combine_tag="unsafe", config=config) == 1.0, "custom kw missed"
    assert behavior_reward(text, combine_tag="unsafe") == 0.0, "default keywords changed"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"refusal_keywords": ("Sorry",)},
        {"refusal_keywords": ("",)},
        {"refusal_keywords": "sorry"},
        {"tag_weight": float("nan")},
        {"behavior_weight": "0.5"},
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(kwargs: dict) -> None:
    field = next(iter(kwargs))
    with pytest.raises((ValueError, TypeError), match=f"RewardConfig.{field}"):
        RewardConfig(**kwargs)


# --- the batch form and input errors ---------------------------------------------------------


def test_score_completions_keeps_order_and_labels() -> None:
    texts = [completion(combined="safe", answer=HELPFUL), completion()]
    result = score_completions(texts, ["safe", "safe"], ["safe", "safe"], ["safe", "unsafe"])
    assert [p.total for p in result] == [1.0, 1.0], "a completion was scored with wrong labels"


def test_score_completions_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="combine_tags"):
        score_completions(["a", "b"], ["safe"] * 2, ["safe"] * 2, ["safe"])


def test_score_completions_rejects_a_single_string() -> None:
    with pytest.raises(TypeError, match="single str"):
        score_completions("abc", ["safe"] * 3, ["safe"] * 3, ["safe"] * 3)


def test_non_string_completion_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="decode"):
        parse_completion([1, 2, 3])  # type: ignore[arg-type]


# --- a plain reference, and properties on generated text -------------------------------------

# docs/method.md section 3 restated as regexes. Nested lazy quantifiers backtrack badly on long
# text, so this is only ever run on the short strings hypothesis generates.
_REF_TAG = r"<{0}_safe>(?:safe|unsafe)</{0}_safe>"
_REF_FORMAT = re.compile(
    ".*?" + _REF_TAG.format("visual") + ".*?" + _REF_TAG.format("text") + ".*?"
    + _REF_TAG.format("combined") + r".*?</think>\s*<answer>.*?</answer>",
    re.DOTALL | re.IGNORECASE,
)  # fmt: skip


def reference_parse(text: str) -> ParsedCompletion:
    def tag(name: str) -> str | None:
        found = re.search(rf"<{name}_safe>(safe|unsafe)</{name}_safe>", text, re.IGNORECASE)
        return found.group(1).casefold() if found else None

    answer = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL | re.IGNORECASE)
    return ParsedCompletion(
        visual=tag("visual"),
        text=tag("text"),
        combined=tag("combined"),
        answer=answer.group(1) if answer else None,
        format_ok=_REF_FORMAT.fullmatch(text.strip()) is not None,
    )


def reference_total(text: str, image_tag: str, text_tag: str, combine_tag: str) -> float:
    found = reference_parse(text)
    if found.combined != combine_tag:
        tag = 0.0
    else:
        tag = 0.5 + 0.25 * (found.visual == image_tag) + 0.25 * (found.text == text_tag)
    behavior = 0.0
    if found.combined == combine_tag and found.answer is not None:
        refused = any(k in found.answer.strip().lower() for k in REFUSAL_KEYWORDS)
        behavior = float(refused) if combine_tag == "unsafe" else float(not refused)
    return float(found.format_ok) * (0.5 * tag + 0.5 * behavior)


_PIECES = [
    *(f"<{n}_safe>" for n in ("visual", "text", "combined")),
    *(f"</{n}_safe>" for n in ("visual", "text", "combined")),
    *(f"<{n}_safe>{v}</{n}_safe>" for n in ("visual", "text", "combined") for v in ("safe", "unsafe")),
    "<think>", "</think>", "<answer>", "</answer>", "</think>\n<answer>",
    "safe", "unsafe", "maybe", "sorry", "sure", "i can't", " ", "\n", "\t", "x", "<", ">", "/",
]  # fmt: skip
# Characters Python's re.IGNORECASE matches with ASCII letters although they are not ASCII.
_LOOKALIKES = {"i": "\u0130\u0131", "s": "\u017f", "k": "\u212a"}


@st.composite
def tag_soup(draw: st.DrawFn) -> str:
    """Text built from tag fragments: unclosed, repeated, nested, mixed case, look-alikes."""
    out = []
    for piece in draw(st.lists(st.sampled_from(_PIECES), max_size=40)):
        style = draw(st.sampled_from(["plain", "plain", "upper", "title", "lookalike"]))
        if style == "upper":
            piece = piece.upper()
        elif style == "title":
            piece = piece.title()
        elif style == "lookalike":
            piece = "".join(draw(st.sampled_from(_LOOKALIKES.get(c, c))) for c in piece)
        out.append(piece)
    return "".join(out)


@st.composite
def near_miss_completion(draw: st.DrawFn) -> str:
    """A well-formed completion with a few parts dropped, duplicated, swapped or padded."""
    parts_ = [
        draw(st.sampled_from(["", "<think>", "  "])),
        *(
            f"<{n}_safe>{draw(st.sampled_from(['safe', 'unsafe', 'Unsafe', 'no']))}</{n}_safe>"
            for n in ("visual", "text", "combined")
        ),
        "</think>",
        draw(st.sampled_from(["", "\n", " x "])),
        "<answer>",
        draw(st.sampled_from([REFUSAL, HELPFUL, "", "a</answer>b"])),
        "</answer>",
        draw(st.sampled_from(["", "\n", ".", "</answer>"])),
    ]
    edits = draw(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10), st.integers(0, 2))))
    for i, j, kind in edits[:3]:
        i, j = i % len(parts_), j % len(parts_)
        if kind == 0:
            parts_[i] = ""
        elif kind == 1:
            parts_[i], parts_[j] = parts_[j], parts_[i]
        else:
            parts_.insert(j, parts_[i])
    return "".join(parts_)


LABELS = st.tuples(*[st.sampled_from(["safe", "unsafe"])] * 3)


@settings(max_examples=300)
@given(text=st.one_of(tag_soup(), near_miss_completion()))
def test_scanner_agrees_with_regex_reference(text: str) -> None:
    assert parse_completion(text) == reference_parse(text), "fast parser and reference disagree"


@settings(max_examples=300)
@given(text=st.one_of(tag_soup(), near_miss_completion()), labels=LABELS)
def test_total_agrees_with_reference_and_stays_in_allowed_set(text: str, labels: tuple) -> None:
    value = safety_reward(text, image_tag=labels[0], text_tag=labels[1], combine_tag=labels[2])
    assert value in ALLOWED_TOTALS, f"total {value} is not one of the seven possible values"
    assert value == reference_total(text, *labels), "total differs from the reference formula"


@given(text=st.text(), labels=LABELS)
def test_never_raises_on_arbitrary_text(text: str, labels: tuple) -> None:
    result = parts(text, *labels)
    assert result.total in ALLOWED_TOTALS, f"total {result.total} outside the allowed set"


# --- linear time on adversarial text ---------------------------------------------------------

_ADVERSARIAL_UNITS = {
    # The authors' regex stalls on this: valid tags over and over, never a valid ending.
    "tag_spam": "<visual_safe>safe</visual_safe><text_safe>safe</text_safe>"
    "<combined_safe>safe</combined_safe></think> ",
    "think_and_space": "</think>" + " " * 20 + "<answe",
    "open_tags": "<visual_safe><text_safe><combined_safe><answer>unsafe",
    "mixed_case": "<VISUAL_SAFE>SAFE</Visual_Safe></THINK>\n<ANSWER>Sorry",
}


def _seconds_to_score(text: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        parts(text)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize("unit", list(_ADVERSARIAL_UNITS.values()), ids=list(_ADVERSARIAL_UNITS))
def test_adversarial_megabyte_scores_under_a_second(unit: str) -> None:
    for size in (100_000, 1_000_000):
        text = (unit * (size // len(unit) + 1))[:size]
        seconds = _seconds_to_score(text, repeats=1)
        assert seconds < 1.0, f"{size} chars took {seconds:.2f} s: super-linear parsing"


@pytest.mark.parametrize("unit", list(_ADVERSARIAL_UNITS.values()), ids=list(_ADVERSARIAL_UNITS))
def test_quadrupling_adversarial_input_roughly_quadruples_time(unit: str) -> None:
    # Best of 5 runs each to shed scheduler noise; linear gives ~4x, quadratic ~16x. The wide
    # gap keeps the test meaningful on a loaded shared CPU.
    quarter = unit * (125_000 // len(unit))
    ratio = _seconds_to_score(quarter * 4, repeats=5) / _seconds_to_score(quarter, repeats=5)
    assert ratio < 8.0, f"quadrupling the input multiplied time by {ratio:.1f}: not linear"
