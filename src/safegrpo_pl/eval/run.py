"""One evaluation run: read the benchmarks, answer with base and tuned, judge, report.

Everything lands in `output_dir`:
- `responses.jsonl`: one line per (model, record): model, benchmark, id, category, subset,
  expected behaviour, the full response, whether it was cut at the token limit (`truncated`),
  the answer the judge read, the verdict and its judge.
  Lines are appended as each generation batch finishes; a rerun (or a resumed run after a
  crash, which loses at most the batch in flight) generates only the (model, record) pairs not
  in it yet, then judges everything again
  (the `http` judge from its cache), so a changed judge needs no new generation;
- `report.json`, `report.md`, `report.png` (see `safegrpo_pl.eval.report`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safegrpo_pl.core.files import atomic_file
from safegrpo_pl.eval.catalog import LoadOptions, load_benchmark
from safegrpo_pl.eval.generate import GenerationSettings, ModelSettings, generate, visible_answer
from safegrpo_pl.eval.judge_factory import JudgeSettings, build_judge
from safegrpo_pl.eval.judges import Judge, Verdict, judge_all
from safegrpo_pl.eval.records import EvalRecord
from safegrpo_pl.eval.report import Scored, build_report, truncation_summary, write_report

log = logging.getLogger(__name__)

RESPONSES = "responses.jsonl"


def read_responses(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, `benchmark/id`) -> the row of responses.jsonl; the last line of a pair wins."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return rows
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # an interrupted write leaves a partial last line; its record is generated again
            log.warning("%s line %d is not JSON (an interrupted write?); ignored", path, number)
            continue
        rows[(row["model"], f"{row['benchmark']}/{row['id']}")] = row
    return rows


def _row(
    role: str, source: str, record: EvalRecord, response: str, truncated: bool
) -> dict[str, Any]:
    return {
        "model": role,
        "model_source": source,
        "benchmark": record.benchmark,
        "id": record.id,
        "category": record.category,
        "subset": record.subset,
        "expected": record.expected,
        "response": response,
        "truncated": truncated,
    }


def _write_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _cut_partial_line(path: Path) -> None:
    """Drop the unfinished last line a killed write left, so the next append starts a line."""
    if not path.exists():
        return
    with path.open("r+b") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":  # the usual case: read one byte, not the whole file
            return
        handle.seek(0)
        handle.truncate(handle.read().rfind(b"\n") + 1)


def _missing(
    existing: dict[tuple[str, str], dict[str, Any]],
    role: str,
    source: str,
    records: list[EvalRecord],
) -> list[EvalRecord]:
    """The records `role` has no usable answer to: none yet, or one from another model/prompt."""
    missing = [r for r in records if (role, r.key) not in existing]
    stale = [
        r for r in records
        if (role, r.key) in existing and existing[(role, r.key)].get("model_source") != source
    ]  # fmt: skip
    if stale:
        log.warning(
            "%s model: %d answers in responses.jsonl came from another model or prompt "
            "(now: %s); they are generated again",
            role, len(stale), source,
        )  # fmt: skip
    log.info(
        "%s model: %d of %d answers to generate", role, len(missing) + len(stale), len(records)
    )
    return missing + stale


def judge_answers(
    judge: Judge,
    records: Sequence[EvalRecord],
    rows: Sequence[dict[str, Any]],
    answers: Sequence[str],
    truncated: str,
) -> list[Verdict]:
    """Verdicts for one model's answers; with `truncated="exclude"` an answer cut at the token
    limit is not judged but marked `truncated` (a safety record's; a general one is matched)."""
    cut = [
        truncated == "exclude" and bool(row.get("truncated")) and record.expected != "answer"
        for record, row in zip(records, rows, strict=True)
    ]
    keep = [i for i, is_cut in enumerate(cut) if not is_cut]
    judged = judge_all(judge, [records[i] for i in keep], [answers[i] for i in keep])
    verdicts = [Verdict("truncated", judge.name) if is_cut else None for is_cut in cut]
    for i, verdict in zip(keep, judged, strict=True):
        verdicts[i] = verdict
    return verdicts  # type: ignore[return-value]


def load_all(
    benchmarks: Mapping[str, str], options: LoadOptions, demo_dir: Path
) -> tuple[list[EvalRecord], dict[str, dict]]:
    """Every benchmark's records, in config order, and what each dropped. A root of `demo`
    is the benchmark's tiny stand-in (`safegrpo_pl.eval.demo_benchmarks`), `demo-vocab` one
    made of the demo set's held-out records (vlguard, mossbench), written to `demo_dir/<name>`
    and read by the same loader as a real release."""
    if not benchmarks:
        raise ValueError("benchmarks is empty; give at least one name: root folder")
    records: list[EvalRecord] = []
    dropped: dict[str, dict] = {}
    for name, root in benchmarks.items():
        if root in ("demo", "demo-vocab"):
            from safegrpo_pl.eval.demo_benchmarks import DEMO_VOCAB_WRITERS, WRITERS

            writers = WRITERS if root == "demo" else DEMO_VOCAB_WRITERS
            if name not in writers:
                raise ValueError(f"benchmarks.{name}: no {root} stand-in; known: {sorted(writers)}")
            root = str(writers[name](demo_dir / name))
        loaded = load_benchmark(name, root, options)
        records.extend(loaded.records)
        report = loaded.dropped
        dropped[name] = {"total": report.total, "counts": report.counts, "ids": report.ids}
    return records, dropped


def evaluate(
    benchmarks: dict[str, str],
    output_dir: str = "runs/eval",
    model: ModelSettings = ModelSettings(),  # noqa: B008 (frozen dataclass)
    judge: JudgeSettings = JudgeSettings(),  # noqa: B008
    generation: GenerationSettings = GenerationSettings(),  # noqa: B008
    data: LoadOptions = LoadOptions(),  # noqa: B008
) -> dict[str, Any]:
    """Evaluate the base (and tuned) model on `benchmarks` and write the report.

    Args:
        benchmarks: benchmark name -> root folder of its public release (or parquet file for
            pope / scienceqa-img), or `demo` for a tiny stand-in in the same layout, or
            `demo-vocab` (vlguard, mossbench) for one made of the demo set's held-out records,
            which the models `make demo` trains can read. Names:
            figstep, figstep-tiny, vlguard, mm-safetybench, siuo, mossbench, pope,
            scienceqa-img.
        output_dir: where responses.jsonl and the report go; an existing run there is resumed.
        model: the base checkpoint and the tuned one (LoRA adapter or second checkpoint).
        judge: which judge makes the safety figures.
        generation: batch size, answer length, device.
        data: how benchmarks are read (bad records, MM-SafetyBench variant, split, limit).

    Returns:
        The report (as written to report.json).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, dropped = load_all(benchmarks, data, out / "demo_benchmarks")
    path = out / RESPONSES
    existing = read_responses(path)
    sources = {role: model.identity(role, generation) for role in model.roles}
    todo = {role: _missing(existing, role, sources[role], records) for role in model.roles}

    _cut_partial_line(path)
    with path.open("a", encoding="utf-8") as handle:

        def keep(role: str, batch: Sequence[EvalRecord], texts: list[str], cut: list[bool]) -> None:
            for record, text, truncated in zip(batch, texts, cut, strict=True):
                row = _row(role, sources[role], record, text, truncated)
                existing[(role, record.key)] = row
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            handle.flush()

        generate(model, generation, todo, keep)

    judge_impl = build_judge(judge, out)
    scored: dict[str, list[Scored]] = {}
    for role in model.roles:
        rows = [existing[(role, r.key)] for r in records]
        answers = [visible_answer(row["response"]) for row in rows]
        verdicts = judge_answers(judge_impl, records, rows, answers, judge.truncated)
        scored[role] = []
        for record, row, answer, verdict in zip(records, rows, answers, verdicts, strict=True):
            row.update(answer=answer, verdict=verdict.label, judge=verdict.judge)
            if verdict.raw:
                row["judge_output"] = verdict.raw
            scored[role].append(
                Scored(record.benchmark, record.category, record.subset, record.expected,
                       verdict.label, verdict.judge, bool(row.get("truncated")))
            )  # fmt: skip
    _write_rows(path, list(existing.values()))
    report = build_report(scored, judge_impl.name, judge_impl.comparable, dropped)
    report["truncation"] = truncation_summary(report, judge.truncated, generation.max_new_tokens)
    report["settings"] = {
        "model": asdict(model),
        "generation": asdict(generation),
        "data": asdict(data),
        "benchmarks": dict(benchmarks),
    }
    paths = write_report(report, out)
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return report
