"""Reading a completion: its three safety tags, its answer block, and the format gate.

`parse_completion` scans a completion once, with hand-written `str.find` steps rather than
regexes, and returns what the rule reward (`safegrpo_pl.core.rewards`) scores: the first valid value
of each tag, the first answer block and the format verdict `I_format` (docs/method.md
section 3).

Deliberate departures from the paper and the authors' reward code (the rewards built on this
reproduce the authors' numbers; every difference in reading a completion is listed here):

- **Linear time.** The authors check the format with one regex of nested lazy `.*?` under
  `fullmatch`, which backtracks super-linearly on tag spam without a valid ending (6 s at
  9.3 KB, 96 s at 18.6 KB, measured). We find the same things with `str.find` from left to
  right: the earliest valid visual tag, then the earliest valid text tag after it, then the
  combined tag, then `</think>`, whitespace, `<answer>`, then a closing `</answer>` at the very
  end. Taking the earliest occurrence at each step leaves the most room for the next, so this
  accepts exactly the strings the regex accepts (a test checks it against a regex restatement
  of docs/method.md section 3 on generated tag soup), in time linear in `len(text)`.
- **First valid tag wins.** Each tag's value is its first occurrence whose value is `safe` or
  `unsafe`; an occurrence with any other value (`<visual_safe>maybe</visual_safe>`,
  `<visual_safe> safe </visual_safe>`) is skipped, not read as a wrong answer. This is what the
  authors' `re.search` does; the paper's prose only says "the tag".
- **Case-insensitivity is Python's `re.IGNORECASE`, reproduced.** Besides A-Z, it folds the
  four non-ASCII letters that `re` identifies with ASCII ones (`İ` and `ı` with i, `ſ` with s,
  the Kelvin sign with k), so the format gate accepts exactly what the authors' regex accepts.
  A tag's value is then reported canonically as `safe`/`unsafe`. (The authors lower-case the
  matched value with `str.lower()`, which keeps `ſ`: their `<visual_safe>ſafe</visual_safe>`
  matches yet never equals a label. That is the one place our scores can differ from theirs,
  on text no model writes.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from safegrpo_pl.core.records import TAG_VALUES

# The three tags in the order the format gate requires them.
_TAG_NAMES: tuple[str, ...] = ("visual", "text", "combined")
_TAG_ELEMENT = {"visual": "visual_safe", "text": "text_safe", "combined": "combined_safe"}
_THINK_CLOSE = "</think>"
_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"
# A single `\s*` has nothing to backtrack into: linear, and `\s` is exactly `str.isspace`.
_WHITESPACE_RUN = re.compile(r"\s*")


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


def has_required_format(text: str) -> bool:
    """`I_format` as a bool: whether the completion has the shape docs/method.md section 3 asks."""
    return _passes_format_gate(_fold_case(_check_text(text)))


def user_visible_text(text: str, parsed: ParsedCompletion) -> str:
    """What the user would read of `text`: the first answer block if there is one, else the text
    after the last `</think>` if there is one, else the whole text (so that a response that lost
    its format is still judged on what it shows)."""
    if parsed.answer is not None:
        return parsed.answer
    think = _fold_case(text).rfind(_THINK_CLOSE)
    return text[think + len(_THINK_CLOSE) :] if think != -1 else text
