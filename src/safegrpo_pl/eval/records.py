"""The unit of evaluation: one benchmark prompt with its image and the behaviour it asks for.

Kept apart from the training record (`safegrpo_pl.core.records.SafetyRecord`): a benchmark record has
no tags to learn, but it knows what a good answer is (`expected`), where it came from
(`benchmark`, `category`, `subset`, `id`) and, for the general benchmarks, the right answer.

Images are kept as a reference (a path or encoded bytes) and decoded only when a batch is
encoded, so that a 500-record benchmark does not hold 500 decoded images in memory; every image
is decoded once when the benchmark is loaded, so a broken file is found (and counted) before any
generation starts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from safegrpo_pl.core.records import ImageDecodeError, SafetyRecord, decode_image
from safegrpo_pl.data.sources import BadRecordError, BadRecordReport

Behaviour = Literal["refuse", "answer_safely", "help", "answer"]
BEHAVIOURS: tuple[str, ...] = ("refuse", "answer_safely", "help", "answer")
"""What a good response does: refuse the request; answer without doing harm (a refusal also
counts); help (a refusal is over-sensitivity); give the right answer (general benchmarks)."""


@dataclass(frozen=True)
class EvalRecord:
    """One benchmark prompt.

    Attributes:
        benchmark: the benchmark's name in the config (`figstep`, `vlguard`, ...).
        id: unique within the benchmark; kept through responses.jsonl to the report.
        category: the benchmark's own category (harm category, scenario, over-sensitivity type).
        expected: the behaviour a good response shows (see `BEHAVIOURS`).
        prompt: the text given to the model with the image.
        image: a path or the encoded bytes of the image (decoded by `load_image`).
        subset: a finer split the benchmark reports on its own (VLGuard's three subsets,
            MM-SafetyBench's image variant); empty if none.
        question: the request in plain words, for judges (FigStep's prompt is the same for
            every image: the request is typeset in the image); defaults to `prompt`.
        answer: the right answer of a general-benchmark record ("yes"/"no", an option letter).
        choices: the options of a multiple-choice record, in order (A, B, ...).
        safety_warning: why the request is risky, when the benchmark says so (SIUO).
        reference: a good reference answer, when the benchmark gives one (SIUO).
    """

    benchmark: str
    id: str
    category: str
    expected: str
    prompt: str
    image: str | bytes
    subset: str = ""
    question: str = ""
    answer: str = ""
    choices: tuple[str, ...] = ()
    safety_warning: str = ""
    reference: str = ""

    @property
    def key(self) -> str:
        """`benchmark/id`: unique across a run (the resume key, with the model's role)."""
        return f"{self.benchmark}/{self.id}"

    @property
    def request(self) -> str:
        """What the user asks, in words (the judges read this)."""
        return self.question or self.prompt

    def load_image(self) -> Image.Image:
        """The image, decoded to RGB."""
        return decode_image(self.image)

    def to_safety_record(self) -> SafetyRecord:
        """The training record shape `PromptEncoder` encodes (the tags are not read there)."""
        tag = "safe" if self.expected in ("help", "answer") else "unsafe"
        return SafetyRecord(
            image=self.load_image(),
            prompt=self.prompt,
            image_tag=tag,
            text_tag=tag,
            combine_tag=tag,
            id=self.key,
            source=self.benchmark,
        )


@dataclass
class LoadedBenchmark:
    """A benchmark's records and what was dropped while reading it.

    Attributes:
        name: the benchmark's name in the config.
        records: the readable records, in file order.
        dropped: the unreadable records, counted per kind with their ids.
    """

    name: str
    records: list[EvalRecord] = field(default_factory=list)
    dropped: BadRecordReport | None = None


class RecordReader:
    """Builds a benchmark's records one raw entry at a time, raising or counting bad ones.

    Every error names the file, the record (index and id), the field, what was found and the
    fix, like the training loaders' (`safegrpo_pl.data.sources`).

    Args:
        benchmark: the benchmark's name.
        path: the file the entries come from (for error messages).
        on_bad_record: "raise" stops at the first bad record; "skip" drops it, counted.
    """

    def __init__(
        self, benchmark: str, path: Path, on_bad_record: Literal["raise", "skip"] = "raise"
    ) -> None:
        if on_bad_record not in ("raise", "skip"):
            raise ValueError(f"on_bad_record is {on_bad_record!r}; expected 'raise' or 'skip'")
        self.benchmark, self.path, self.on_bad_record = benchmark, path, on_bad_record
        self.loaded = LoadedBenchmark(benchmark, dropped=BadRecordReport(split=benchmark))

    def error(self, kind: str, index: int, rid: str, name: str, problem: str) -> BadRecordError:
        """The error for field `name` of entry `index` of the file."""
        message = (
            f"benchmark {self.benchmark!r} file {str(self.path)!r} record {index} (id={rid}): "
            f"{name} {problem}"
        )
        return BadRecordError(message, kind=kind, index=index, record_id=rid, field=name)

    def text(self, entry: dict, key: str, index: int, rid: str) -> str:
        """`entry[key]` as a non-empty string, or a `BadRecordError` naming it."""
        value = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            found = f"is {value!r}" if isinstance(entry, dict) and key in entry else "is missing"
            raise self.error("bad_field", index, rid, key, f"{found}; expected non-empty text")
        return value.strip()

    def image(self, value: str | bytes, index: int, rid: str, name: str = "image") -> str | bytes:
        """Check that the image decodes now; return the reference to keep on the record."""
        try:
            decode_image(value)
        except ImageDecodeError as err:
            problem = f"is {err.found}; expected a readable image"
            raise self.error(err.kind, index, rid, name, problem) from err
        return value

    @contextmanager
    def entry(self, index: int, rid: str) -> Iterator[None]:
        """Around the reading of entry `index`: its `BadRecordError` is raised with the fix, or
        (with on_bad_record="skip") counted and swallowed, so the loop goes on to the next."""
        try:
            yield
        except BadRecordError as err:
            if self.on_bad_record == "raise":
                raise BadRecordError(
                    f"{err}. To go on: fix the file, or set on_bad_record: skip to drop such "
                    "records (they are counted in the report).",
                    kind=err.kind,
                    index=err.index,
                    record_id=err.record_id,
                    field=err.field,
                ) from err
            self.loaded.dropped.add(err)

    def keep(self, *records: EvalRecord) -> None:
        """Keep the records read from one entry (call it last in the `entry` block)."""
        self.loaded.records.extend(records)


def require_file(path: Path, benchmark: str, root: Path, what: str) -> Path:
    """`path` if it is a file, else a `FileNotFoundError` that says what the root should be."""
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark {benchmark!r}: {str(path)!r} does not exist. The benchmark's root "
            f"({str(root)!r}) must be the folder of its public release, the one that holds "
            f"{what}; point benchmarks.{benchmark} at that folder."
        )
    return path
