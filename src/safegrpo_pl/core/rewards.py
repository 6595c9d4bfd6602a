"""Rule rewards for SafeGRPO: completion strings in, floats out (docs/method.md section 3).

`R = I_format * (tag_weight * R_tag + behavior_weight * R_behavior)`, with the format gate,
the tag reward and the behaviour reward computed from one scan of the text
(`safegrpo_pl.core.completion_parser`, which lists how reading a completion departs from the
authors' regexes: linear time, first valid tag wins, `re.IGNORECASE` folding).

Deliberate departures from the paper and the authors' reward code (the defaults reproduce the
authors' numbers):

- **Refusal is a plain substring test** on the stripped, lower-cased answer: any keyword
  anywhere counts, so a helpful answer mentioning "unrestricted" is a refusal and "I can’t"
  with a curly apostrophe is not. Kept for fidelity; a judge belongs to evaluation, not here.
- Labels (`image_tag`, ...) are stripped and lower-cased before they are compared.

Additions (not departures): `RewardParts` also reports the ungated tag and behaviour rewards,
per-tag correctness and a `refused` flag, for the training-time metrics of docs/method.md
section 5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

from safegrpo_pl.core.completion_parser import (
    ParsedCompletion,
    has_required_format,
    parse_completion,
    user_visible_text,
)

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


def _label(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} is {value!r}; expected the string 'safe' or 'unsafe'")
    return value.strip().lower()


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
    """`I_format`: 1.0 if the completion has the required shape (docs/method.md section 3),
    else 0.0."""
    return 1.0 if has_required_format(text) else 0.0


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
    return RewardParts(
        total=total,
        format=format_gate,
        tag=tag,
        behavior=behavior,
        refused=is_refusal(user_visible_text(text, parsed), config.refusal_keywords),
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
