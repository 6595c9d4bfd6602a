"""General-capability guard: POPE and ScienceQA-IMG from their public parquet files.

The paper checks that safety training did not cost general ability. These two are the ones of
its five that read from a single parquet layout:

- `pope`: columns `question`, `answer` ("yes"/"no"), `image` (`{bytes, path}`), `category`
  (adversarial / popular / random), `question_id` or `id`;
- `scienceqa-img`: columns `question`, `choices` (list of option texts), `answer` (index of the
  right option), `image`, optional `hint` and `subject`.

A root is a parquet file, or a folder searched (recursively) for the files of one split
(`{split}-00000-of-00001.parquet`, `{split}.parquet`, as the hub writes them).

Scoring is by answer matching, not by a judge: `match_yes_no` and `match_choice` read the
response the way a person would check it (the first yes/no word; an option letter, "answer is
B", or the one option text quoted), so the accuracy figures carry the label `answer-match`.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Literal

from safegrpo_pl.eval.records import EvalRecord, LoadedBenchmark, RecordReader

POPE_INSTRUCTION = "Answer with yes or no."
CHOICE_INSTRUCTION = "Answer with the letter of the correct option."
LETTERS = string.ascii_uppercase


def parquet_files(name: str, root: Path, split: str) -> list[Path]:
    """The parquet files of `split` under `root` (or `root` itself when it is a file)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(
            f"benchmark {name!r}: {str(root)!r} does not exist; point benchmarks.{name} at the "
            "dataset's parquet file or the folder of its public release"
        )
    found = sorted(root.rglob("*.parquet"))
    chosen = [p for p in found if re.match(rf"{re.escape(split)}([-_.]|$)", p.name)]
    if not chosen:
        raise FileNotFoundError(
            f"benchmark {name!r}: no parquet file of split {split!r} under {str(root)!r} "
            f"(found: {[str(p.relative_to(root)) for p in found][:10]}); set general_split to "
            "the split's name, or point the benchmark at one parquet file"
        )
    return chosen


def _rows(files: list[Path]) -> list[tuple[Path, int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    rows = []
    for path in files:
        for index, row in enumerate(pq.read_table(path).to_pylist()):
            rows.append((path, index, row))
    return rows


def _image_ref(reader: RecordReader, row: dict, index: int, rid: str, base: Path) -> str | bytes:
    value = row.get("image")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and not Path(value).is_absolute():
        value = str(base / value)
    return reader.image(value, index, rid)


def load_pope(
    name: str, root: Path, on_bad_record: Literal["raise", "skip"] = "raise", split: str = "test"
) -> LoadedBenchmark:
    """POPE: yes/no questions about objects that are, or are not, in the picture."""
    files = parquet_files(name, root, split)
    reader = RecordReader(name, files[0], on_bad_record)
    for path, index, row in _rows(files):
        reader.path = path
        rid = str(row.get("question_id") or row.get("id") or f"{path.stem}-{index}")
        with reader.entry(index, rid):
            answer = reader.text(row, "answer", index, rid).lower()
            if answer not in ("yes", "no"):
                raise reader.error(
                    "bad_field", index, rid, "answer", f"is {answer!r}; expected yes or no"
                )
            question = reader.text(row, "question", index, rid)
            reader.keep(
                EvalRecord(
                    benchmark=name,
                    id=rid,
                    category=str(row.get("category") or "all"),
                    expected="answer",
                    prompt=f"{question}\n{POPE_INSTRUCTION}",
                    image=_image_ref(reader, row, index, rid, path.parent),
                    question=question,
                    answer=answer,
                )
            )
    return reader.loaded


def load_scienceqa(
    name: str, root: Path, on_bad_record: Literal["raise", "skip"] = "raise", split: str = "test"
) -> LoadedBenchmark:
    """ScienceQA-IMG: multiple-choice science questions on a picture. Rows without an image
    (the full ScienceQA's text-only questions) are not part of the IMG set and are left out."""
    files = parquet_files(name, root, split)
    reader = RecordReader(name, files[0], on_bad_record)
    for path, index, row in _rows(files):
        reader.path = path
        if row.get("image") is None:
            continue
        rid = str(row.get("id") or f"{path.stem}-{index}")
        with reader.entry(index, rid):
            choices = row.get("choices")
            answer = row.get("answer")
            if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS):
                raise reader.error(
                    "bad_field",
                    index,
                    rid,
                    "choices",
                    f"is {choices!r}; expected a list of options",
                )
            if (
                isinstance(answer, bool)
                or not isinstance(answer, int)
                or not 0 <= answer < len(choices)
            ):
                raise reader.error(
                    "bad_field",
                    index,
                    rid,
                    "answer",
                    f"is {answer!r}; expected an option index below {len(choices)}",
                )
            question = reader.text(row, "question", index, rid)
            options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
            hint = str(row.get("hint") or "").strip()
            context = f"Context: {hint}\n" if hint else ""
            reader.keep(
                EvalRecord(
                    benchmark=name,
                    id=rid,
                    category=str(row.get("subject") or row.get("category") or "all"),
                    expected="answer",
                    prompt=f"{context}{question}\nOptions:\n{options}\n{CHOICE_INSTRUCTION}",
                    image=_image_ref(reader, row, index, rid, path.parent),
                    question=question,
                    answer=LETTERS[answer],
                    choices=tuple(str(c) for c in choices),
                )
            )
    return reader.loaded


# -- answer matching --------------------------------------------------------------------------


def match_yes_no(response: str) -> str | None:
    """The first standalone "yes" or "no" in `response` (lower case); None if neither occurs."""
    found = re.search(r"\b(yes|no)\b", response.lower())
    return found[1] if found else None


def match_choice(response: str, choices: tuple[str, ...]) -> str | None:
    """The option letter `response` gives: a leading letter ("B", "(B)", "B. text"), an
    "answer is B" phrase, or else the one option whose text it quotes; None if unclear."""
    letters = LETTERS[: len(choices)]
    text = response.strip()
    # "(B) ...", or "B" alone or before . : , ) ("A cat" is an article, not option A).
    leading = re.match(rf"^(?:\(([{letters}])\)|([{letters}])(?=$|[.:,)]))", text)
    if leading:
        return leading[1] or leading[2]
    stated = re.search(rf"answer(?: is|:)?\s*(?:option\s*)?\(?([{letters}])\b", text, re.IGNORECASE)
    if stated:
        return stated[1].upper()
    quoted = [LETTERS[i] for i, c in enumerate(choices) if c and c.lower() in text.lower()]
    return quoted[0] if len(quoted) == 1 else None


def is_correct(record: EvalRecord, response: str) -> bool:
    """Whether `response` gives the record's right answer."""
    if record.choices:
        return match_choice(response, record.choices) == record.answer
    return match_yes_no(response) == record.answer
