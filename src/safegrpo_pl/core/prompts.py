"""The step-guided safety prompt and the SafeGRPO response format (docs/method.md section 2).

Pure strings (the tag values come from `records`): the guide appended to every instruction,
the function that joins them, a builder for completions in the format the rule reward parses,
and a few canned answers (refusing / helpful) used by the demo set, the format warm-up and the
tests.

Departures from the paper:
- The guide is our own, deliberately compact wording of the paper's five steps (caption, visual
  judgement, textual judgement, combined judgement, summary): every token of it is prefilled
  for every prompt and every one of the G sampled completions, so brevity is speed.
- The guide names the exact tag spellings the reward parser expects, so that a model that has
  never seen the format can follow it from the prompt alone.
"""

from __future__ import annotations

from safegrpo_pl.core.records import TAG_VALUES

DEFAULT_SAFETY_GUIDE: str = (
    "Before replying, reason step by step inside <think> </think>: "
    "1. Describe the image in one sentence. "
    "2. Decide whether the image by itself is harmful, then write "
    "<visual_safe>safe</visual_safe> or <visual_safe>unsafe</visual_safe>. "
    "3. Decide whether the request by itself shows harmful intent, then write "
    "<text_safe>safe</text_safe> or <text_safe>unsafe</text_safe>. "
    "4. Decide whether the image and the request together could lead to harm, then write "
    "<combined_safe>safe</combined_safe> or <combined_safe>unsafe</combined_safe>. "
    "5. Sum up your safety judgement in one sentence. "
    "Then give your reply inside <answer> </answer>: if the combination is unsafe, decline "
    "politely and say why; otherwise help as well as you can."
)
"""Our wording of the five-step guide; the default `guide` everywhere a prompt is built."""

REFUSAL_ANSWERS: tuple[str, ...] = (
    "Sorry, I cannot help with that.",
    "Sorry, I cannot help with that, because it could be used to hurt someone.",
    "I am unable to assist with this request: together with the image it is unsafe.",
    "I must refuse: following this instruction could cause real harm.",
    "Sorry, that is not appropriate for me to help with, since it risks harm.",
)
"""Polite refusals; each contains at least one refusal keyword of docs/method.md section 3.

The first is the one the format warm-up teaches by default (`WarmupSettings.answer_choices`
1), short on purpose: every GRPO step samples it token by token, and the demo's completions
went from 43 to 25 tokens, a step from 1.85 s to 1.20 s on 2 cores (in-run timings, 300 steps
each, `time/step_total`).
"""

HELPFUL_ANSWERS: tuple[str, ...] = (
    "Sure, here you go.",
    "Sure, here is a short description of what the picture shows.",
    "Happy to help: the object in the image is drawn in simple shapes and colours.",
    "Here is a helpful answer to your question about the picture.",
    "Of course. The image shows an everyday object on a plain background.",
)
"""Helpful replies; none contains any refusal keyword, not even as a substring (the first is
the warm-up's default, short for the reason given above)."""


def build_user_text(prompt: str, guide: str | None = DEFAULT_SAFETY_GUIDE) -> str:
    """Join the user's instruction and the safety guide into the text of the user turn.

    The instruction comes first so that the guide reads as a rule about it (the paper's order).

    Args:
        prompt: the user's instruction, as stored in the record.
        guide: the step-guided safety guide; None or "" for the instruction alone (e.g. to
            evaluate a model without the guide).

    Returns:
        `prompt`, then a blank line and the guide when a guide is given.
    """
    if not guide:
        return prompt
    return f"{prompt}\n\n{guide}"


def _check_tag(name: str, value: str) -> str:
    normalised = value.strip().lower()
    if normalised not in TAG_VALUES:
        raise ValueError(f"format_response: {name} is {value!r}; expected 'safe' or 'unsafe'")
    return normalised


def format_response(
    *,
    visual: str,
    text: str,
    combined: str,
    answer: str,
    caption: str = "",
    summary: str = "",
    open_think: bool = True,
) -> str:
    """A completion in the SafeGRPO format, which the rule reward's format gate accepts.

    Layout: `<think>caption <visual_safe>v</visual_safe> <text_safe>t</text_safe>
    <combined_safe>c</combined_safe> summary</think>` then a newline and
    `<answer>answer</answer>`. Kept on few lines and short because the format warm-up trains on
    it and a tiny model must reproduce it within a small token budget.

    Args:
        visual: "safe" or "unsafe" (any case), the value of `<visual_safe>`.
        text: "safe" or "unsafe", the value of `<text_safe>`.
        combined: "safe" or "unsafe", the value of `<combined_safe>`.
        answer: the final reply put inside `<answer> </answer>`.
        caption: an optional one-sentence caption before the visual tag (step 1).
        summary: an optional one-sentence safety summary after the combined tag (step 5).
        open_think: whether to start with `<think>`; pass False for thinking models whose chat
            template already ends the prompt with `<think>`.

    Returns:
        The completion text (tag values lower-cased).

    Raises:
        ValueError: if a tag value is not safe/unsafe.
    """
    values = [
        _check_tag(n, v) for n, v in (("visual", visual), ("text", text), ("combined", combined))
    ]
    parts = [caption.strip()] if caption.strip() else []
    parts += [
        f"<visual_safe>{values[0]}</visual_safe>",
        f"<text_safe>{values[1]}</text_safe>",
        f"<combined_safe>{values[2]}</combined_safe>",
    ]
    if summary.strip():
        parts.append(summary.strip())
    think = " ".join(parts)
    opening = "<think>" if open_think else ""
    return f"{opening}{think}</think>\n<answer>{answer.strip()}</answer>"
