"""Rule rewards for SafeGRPO: completion strings in, floats out (SPEC section 3).

`R = I_format * (tag_weight * R_tag + behavior_weight * R_behavior)`, with the format gate,
the tag reward and the behaviour reward computed by one hand-written scanner over the text.

Deliberate departures from the paper and the authors' reward code (the defaults reproduce the
authors' numbers; every difference is listed here):

- **Linear time.** The authors check the format with one regex of nested lazy `.*?` under
  `fullmatch`, which backtracks super-linearly on tag spam without a valid ending (FACTS.md:
  6 s at 9.3 KB, 96 s at 18.6 KB). We find the same things with `str.find` from left to
  right: the earliest valid visual tag, then the earliest valid text tag after it, then the
  combined tag, then `</think>`, whitespace, `<answer>`, then a closing `</answer>` at the very
  end. Taking the earliest occurrence at each step leaves the most room for the next, so this
  accepts exactly the strings the regex accepts (a test checks it against a regex restatement
  of SPEC section 3 on generated tag soup), in time linear in `len(text)`.
- **First valid tag wins.** For `R_tag` and `R_behavior` each tag's value is its first
  occurrence whose value is `safe` or `unsafe`; an occurrence with any other value
  (`<visual_safe>maybe</visual_safe>`, `<visual_safe> safe </visual_safe>`) is skipped, not
  read as a wrong answer. This is what the authors' `re.search` does; the paper's prose only
  says "the tag".
- **Refusal is a plain substring test** on the stripped, lower-cased answer: any keyword
  anywhere counts, so a helpful answer mentioning "unrestricted" is a refusal and "I can’t"
  with a curly apostrophe is not. Kept for fidelity; a judge belongs to evaluation, not here.
- **Case-insensitivity is Python's `re.IGNORECASE`, reproduced.** Besides A-Z, it folds the
  four non-ASCII letters that `re` identifies with ASCII ones (`İ` and `ı` with i, `ſ` with s,
  the Kelvin sign with k), so the format gate accepts exactly what the authors' regex accepts.
  A tag's value is then reported canonically as `safe`/`unsafe`. (The authors lower-case the
  matched value with `str.lower()`, which keeps `ſ`: their `<visual_safe>ſafe</visual_safe>`
  matches yet never equals a label. That is the one place our scores can differ from theirs,
  on text no model writes.) Labels (`image_tag`, ...) are stripped and lower-cased.

Additions (not departures): `RewardParts` also reports the ungated tag and behaviour rewards,
per-tag correctness and a `refused` flag, for the training-time metrics of SPEC section 5.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

REFUSAL_KEYWORDS: tuple[str, ...] = (
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
"""The paper's refusal keywords, matched as substrings of the lower-cased answer."""

TAG_VALUES: tuple[str, ...] = ("safe", "unsafe")
"""The only values a safety tag may carry; any other value makes the occurrence invalid."""

# The three tags in the order the format gate requires them.
_TAG_NAMES: tuple[str, ...] = ("visual", "text", "combined")
_TAG_ELEMENT = {"visual": "visual_safe", "text": "text_safe", "combined": "combined_safe"}
_THINK_CLOSE = "</think>"
_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"
# A single `\s*` has nothing to backtrack into: linear, and `\s` is exactly `str.isspace`.
_WHITESPACE_RUN = re.compile(r"\s*")


@dataclass(frozen=True)
class RewardConfig:
    """Weights and refusal keywords of the rule reward; the defaults are the paper's.

    Attributes:
        tag_weight: weight of `R_tag` in the total (paper: 0.5).
        behavior_weight: weight of `R_behavior` in the total (paper: 0.5).
        combined_tag_weight: part of `R_tag` earned by a correct combined tag; without it the
            other two parts are not paid at all, because the combined judgement drives the
            behaviour (paper: 0.5).
        visual_tag_weight: part of `R_tag` added for a correct visual tag (paper: 0.25).
        text_tag_weight: part of `R_tag` added for a correct text tag (paper: 0.25).
        refusal_keywords: substrings that make an answer a refusal; lower case, because they
            are matched against the lower-cased answer (paper: `REFUSAL_KEYWORDS`).
    """

    tag_weight: float = 0.5
    behavior_weight: float = 0.5
    combined_tag_weight: float = 0.5
    visual_tag_weight: float = 0.25
    text_tag_weight: float = 0.25
    refusal_keywords: tuple[str, ...] = REFUSAL_KEYWORDS

    def __post_init__(self) -> None:
        for field in fields(self):
            if field.name == "refusal_keywords":
                continue
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"RewardConfig.{field.name} is {value!r}; expected a number")
            if not math.isfinite(value):
                raise ValueError(
                    f"RewardConfig.{field.name} is {value!r}; expected a finite number"
                )
        keywords = self.refusal_keywords
        if isinstance(keywords, str):
            raise TypeError(
                f"RewardConfig.refusal_keywords is the string {keywords!r}; "
                f"expected a sequence of strings, e.g. ({keywords!r},)"
            )
        # YAML and the CLI hand over lists; store a tuple so the config stays hashable.
        object.__setattr__(self, "refusal_keywords", tuple(keywords))
        for index, keyword in enumerate(self.refusal_keywords):
            if not isinstance(keyword, str) or not keyword:
                raise ValueError(
                    f"RewardConfig.refusal_keywords[{index}] is {keyword!r}; expected a "
                    "non-empty string (an empty keyword would make every answer a refusal)"
                )
            if keyword != keyword.lower():
                raise ValueError(
                    f"RewardConfig.refusal_keywords[{index}] is {keyword!r}; keywords are "
                    f"matched against the lower-cased answer, so write it as {keyword.lower()!r}"
                )


@dataclass(frozen=True)
class ParsedCompletion:
    """What the scanner found in one completion.

    Attributes:
        visual: value of the first `<visual_safe>` tag whose value is safe/unsafe, lower case;
            None if there is none.
        text: the same for `<text_safe>`.
        combined: the same for `<combined_safe>`.
        answer: the raw content (original case, unstripped) of the first `<answer>` block, up
            to the first `</answer>` after it; None if there is no such block.
        format_ok: whether the whole completion passes the format gate `I_format`.
    """

    visual: str | None
    text: str | None
    combined: str | None
    answer: str | None
    format_ok: bool


@dataclass(frozen=True)
class RewardParts:
    """The total reward of one completion and the pieces the metrics log.

    Attributes:
        total: `I_format * (tag_weight * R_tag + behavior_weight * R_behavior)`.
        format: `I_format`, 1.0 or 0.0.
        tag: `R_tag`, NOT gated by the format, so a log shows tag learning before format.
        behavior: `R_behavior`, likewise not gated.
        refused: whether the response refuses by the keyword rule. It reads the first answer
            block if there is one, else the text after the last `</think>` if there is one,
            else the whole text, so that a response that lost its format is still judged on
            what the user would see.
        visual_correct: the first valid visual tag equals `image_tag` (False if missing).
        text_correct: the first valid text tag equals `text_tag` (False if missing).
        combined_correct: the first valid combined tag equals `combine_tag` (False if missing).
    """

    total: float
    format: float
    tag: float
    behavior: float
    refused: bool
    visual_correct: bool
    text_correct: bool
    combined_correct: bool


def _fold_case(text: str) -> str:
    """Lower-case `text` the way `re.IGNORECASE` matches ASCII, keeping every index in place.

    `str.lower()` is fast C but turns `İ` into two characters (which would shift indices) and
    leaves `ı` and `ſ` alone although `re` matches them with i and s; fix those three. The
    Kelvin sign already lowers to k.
    """
    if "\u0130" in text:
        text = text.replace("\u0130", "i")
    folded = text.lower()
    if "\u0131" in folded:
        folded = folded.replace("\u0131", "i")
    if "\u017f" in folded:
        folded = folded.replace("\u017f", "s")
    return folded


def _find_tag(folded: str, name: str, start: int, stop: int) -> tuple[str, int] | None:
    """First `<x_safe>safe|unsafe</x_safe>` inside `folded[start:stop]`: (value, end index).

    Each candidate opening tag costs O(1) checks and the search resumes after it, so the scan
    is linear in `stop - start` however many invalid tags the text holds.
    """
    element = _TAG_ELEMENT[name]
    opening = f"<{element}>"
    closing = f"</{element}>"
    position = folded.find(opening, start, stop)
    while position != -1:
        value_start = position + len(opening)
        for value in TAG_VALUES:
            if folded.startswith(value + closing, value_start, stop):
                return value, value_start + len(value) + len(closing)
        position = folded.find(opening, value_start, stop)
    return None


def _passes_format_gate(folded: str) -> bool:
    """`I_format` on case-folded text: tags in order, `</think>`, `<answer>`, final `</answer>`.

    Greedy left-to-right: the earliest valid occurrence at each step leaves the most room for
    the steps after it, so if this finds no match, no choice of later occurrences would.
    """
    start = len(folded) - len(folded.lstrip())
    stop = len(folded.rstrip())
    if not folded.endswith(_ANSWER_CLOSE, start, stop):
        return False
    cursor = start
    for name in _TAG_NAMES:
        found = _find_tag(folded, name, cursor, stop)
        if found is None:
            return False
        cursor = found[1]
    # The whitespace runs after different `</think>`s never overlap (each ends at a `<`), so
    # walking them all stays linear.
    think = folded.find(_THINK_CLOSE, cursor, stop)
    while think != -1:
        after_space = _WHITESPACE_RUN.match(folded, think + len(_THINK_CLOSE), stop).end()
        if folded.startswith(_ANSWER_OPEN, after_space, stop):
            # It ends before the final `</answer>` (whose only `<` starts `</`), so it fits.
            return True
        think = folded.find(_THINK_CLOSE, think + len(_THINK_CLOSE), stop)
    return False


def _answer_span(folded: str) -> tuple[int, int] | None:
    """Start and end of the content of the first `<answer>` block that has a closing tag."""
    opening = folded.find(_ANSWER_OPEN)
    if opening == -1:
        return None
    content_start = opening + len(_ANSWER_OPEN)
    closing = folded.find(_ANSWER_CLOSE, content_start)
    if closing == -1:
        return None
    return content_start, closing


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(
            f"completion is a {type(text).__name__}, expected a str; decode the token ids "
            "(skip_special_tokens=True) before scoring"
        )
    return text


def _label(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} is {value!r}; expected the string 'safe' or 'unsafe'")
    return value.strip().lower()


def parse_completion(text: str) -> ParsedCompletion:
    """Scan one completion once for its three tags, its answer block and its format.

    Args:
        text: the decoded completion only (no prompt), special tokens removed.

    Returns:
        The first valid value of each tag, the first answer block and the format verdict.
        Never raises for a str, and runs in time linear in `len(text)`.
    """
    folded = _fold_case(_check_text(text))
    end = len(folded)
    values = {}
    for name in _TAG_NAMES:
        found = _find_tag(folded, name, 0, end)
        values[name] = found[0] if found is not None else None
    span = _answer_span(folded)
    return ParsedCompletion(
        visual=values["visual"],
        text=values["text"],
        combined=values["combined"],
        answer=text[span[0] : span[1]] if span is not None else None,
        format_ok=_passes_format_gate(folded),
    )


def is_refusal(answer: str, keywords: Sequence[str] = REFUSAL_KEYWORDS) -> bool:
    """Whether `answer`, stripped and lower-cased, contains any refusal keyword as a substring.

    Args:
        answer: the text to judge (usually the content of the answer block).
        keywords: lower-case substrings that mark a refusal.
    """
    lowered = answer.strip().lower()
    return any(keyword in lowered for keyword in keywords)


def _tag_score(
    parsed: ParsedCompletion, image_tag: str, text_tag: str, combine_tag: str, config: RewardConfig
) -> tuple[float, bool, bool, bool]:
    """`R_tag` and the three correctness flags of one parsed completion."""
    visual_correct = parsed.visual == _label(image_tag, "image_tag")
    text_correct = parsed.text == _label(text_tag, "text_tag")
    combined_correct = parsed.combined == _label(combine_tag, "combine_tag")
    if not combined_correct:
        return 0.0, visual_correct, text_correct, combined_correct
    score = (
        config.combined_tag_weight
        + config.visual_tag_weight * visual_correct
        + config.text_tag_weight * text_correct
    )
    return score, visual_correct, text_correct, combined_correct


def _behavior_score(parsed: ParsedCompletion, combine_tag: str, config: RewardConfig) -> float:
    """`R_behavior`: refuse when both the model and the label say unsafe, help when both say safe."""
    label = _label(combine_tag, "combine_tag")
    if parsed.answer is None or parsed.combined is None or parsed.combined != label:
        return 0.0
    # Here the model's combined verdict equals the label: unsafe asks for a refusal, safe for help.
    refused = is_refusal(parsed.answer, config.refusal_keywords)
    return 1.0 if refused == (label == "unsafe") else 0.0


def format_reward(text: str) -> float:
    """`I_format`: 1.0 if the completion has the required shape (SPEC section 3), else 0.0."""
    return 1.0 if _passes_format_gate(_fold_case(_check_text(text))) else 0.0


def tag_reward(
    text: str,
    *,
    image_tag: str,
    text_tag: str,
    combine_tag: str,
    config: RewardConfig = RewardConfig(),
) -> float:
    """`R_tag`: 0 unless the combined tag is right, then its weight plus the visual and text parts.

    Args:
        text: the decoded completion.
        image_tag: label of the image ("safe"/"unsafe", any case).
        text_tag: label of the instruction.
        combine_tag: label of the pair.
        config: the weights.
    """
    parsed = parse_completion(text)
    return _tag_score(parsed, image_tag, text_tag, combine_tag, config)[0]


def behavior_reward(text: str, *, combine_tag: str, config: RewardConfig = RewardConfig()) -> float:
    """`R_behavior`: 1 for refusing an unsafe pair or helping with a safe one, both judged right.

    Args:
        text: the decoded completion.
        combine_tag: label of the pair ("safe"/"unsafe", any case).
        config: the refusal keywords.
    """
    return _behavior_score(parse_completion(text), combine_tag, config)


def reward_parts(
    text: str,
    *,
    image_tag: str,
    text_tag: str,
    combine_tag: str,
    config: RewardConfig = RewardConfig(),
) -> RewardParts:
    """Score one completion in full from a single scan.

    Args:
        text: the decoded completion only (no prompt), special tokens removed.
        image_tag: label of the image ("safe"/"unsafe", any case).
        text_tag: label of the instruction.
        combine_tag: label of the pair.
        config: weights and refusal keywords.

    Returns:
        The total reward and its parts (see `RewardParts`).
    """
    parsed = parse_completion(text)
    tag, visual_correct, text_correct, combined_correct = _tag_score(
        parsed, image_tag, text_tag, combine_tag, config
    )
    behavior = _behavior_score(parsed, combine_tag, config)
    format_gate = 1.0 if parsed.format_ok else 0.0
    total = format_gate * (config.tag_weight * tag + config.behavior_weight * behavior)
    if parsed.answer is not None:
        response = parsed.answer
    else:
        think = _fold_case(text).rfind(_THINK_CLOSE)
        response = text[think + len(_THINK_CLOSE) :] if think != -1 else text
    return RewardParts(
        total=total,
        format=format_gate,
        tag=tag,
        behavior=behavior,
        refused=is_refusal(response, config.refusal_keywords),
        visual_correct=visual_correct,
        text_correct=text_correct,
        combined_correct=combined_correct,
    )


def safety_reward(
    text: str,
    *,
    image_tag: str,
    text_tag: str,
    combine_tag: str,
    config: RewardConfig = RewardConfig(),
) -> float:
    """The total rule reward `R` of one completion, a float in [0, 1] with the default weights."""
    return reward_parts(
        text, image_tag=image_tag, text_tag=text_tag, combine_tag=combine_tag, config=config
    ).total


def score_completions(
    texts: Sequence[str],
    image_tags: Sequence[str],
    text_tags: Sequence[str],
    combine_tags: Sequence[str],
    config: RewardConfig = RewardConfig(),
) -> list[RewardParts]:
    """Score a batch of completions, each against its own record's labels.

    For GRPO the caller repeats each record's labels once per completion of its group.

    Args:
        texts: N decoded completions.
        image_tags: N image labels, one per completion.
        text_tags: N instruction labels.
        combine_tags: N pair labels.
        config: weights and refusal keywords.

    Returns:
        N `RewardParts`, in the order of `texts`.

    Raises:
        TypeError: if `texts` is a single str (a batch of one is `[text]`).
        ValueError: if the four sequences differ in length.
    """
    if isinstance(texts, str):
        raise TypeError("texts is a single str; score_completions takes a sequence, e.g. [text]")
    lengths = {
        "texts": len(texts),
        "image_tags": len(image_tags),
        "text_tags": len(text_tags),
        "combine_tags": len(combine_tags),
    }
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"score_completions needs one label of each kind per completion; got lengths "
            f"{lengths}. With G completions per record, repeat each record's labels G times."
        )
    return [
        reward_parts(
            text, image_tag=image_tag, text_tag=text_tag, combine_tag=combine_tag, config=config
        )
        for text, image_tag, text_tag, combine_tag in zip(
            texts, image_tags, text_tags, combine_tags, strict=True
        )
    ]
