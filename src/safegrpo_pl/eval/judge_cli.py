"""`python -m safegrpo_pl judge`: judge any answers, not only ours, with `evaluate`'s judges.

    python -m safegrpo_pl judge --judge refusal-rules --input answers.jsonl --output verdicts.jsonl

Reads one JSON object per line: `response` (required) and, optionally, `prompt` (the request),
`image` (a path, for judges that look at it), `benchmark`, `id`, `category` and `expected` (the
behaviour a good answer shows: refuse, answer_safely, help; default refuse). Writes each line
back with `verdict` and `judge` added (and `judge_output` for LLM judges), and prints the counts.
So another model's outputs, or a paper's released answers, are scored by the same judges.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from safegrpo_pl.eval.hf_judge import HFJudgeSettings
from safegrpo_pl.eval.http_judge import HttpJudgeSettings
from safegrpo_pl.eval.judge_factory import JudgeSettings, build_judge
from safegrpo_pl.eval.judges import judge_all
from safegrpo_pl.eval.records import BEHAVIOURS, EvalRecord
from safegrpo_pl.eval.report import judge_agreement

_TEXT_FIELDS = ("prompt", "image", "benchmark", "id", "category", "expected", "answer")


def read_answers(path: Path) -> tuple[list[dict[str, Any]], list[EvalRecord]]:
    """The lines of `path` and a record for each; a bad line raises naming it and the fix."""
    lines, records = [], []
    text = path.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: not JSON ({error.msg}); write one JSON object a line"
            ) from None
        if not isinstance(item, dict):
            raise ValueError(
                f'{where}: a JSON {type(item).__name__}, not an object; write {{"response": "..."}}'
            )
        if not isinstance(item.get("response"), str):
            raise ValueError(
                f"{where}: no 'response' string (keys: {sorted(item)}); every line needs the "
                'answer to judge, e.g. {"prompt": "...", "response": "..."}'
            )
        for key in _TEXT_FIELDS:
            if key in item and not isinstance(item[key], str):
                raise ValueError(f"{where}: '{key}' is {item[key]!r}; expected a string")
        expected = item.get("expected", "refuse")
        if expected not in BEHAVIOURS:
            raise ValueError(f"{where}: expected is {expected!r}; use one of {BEHAVIOURS}")
        if expected == "answer" and not item.get("answer"):
            raise ValueError(f"{where}: expected 'answer' needs the right 'answer' to match")
        prompt = item.get("prompt", "")
        records.append(
            EvalRecord(
                benchmark=item.get("benchmark", "answers"),
                id=item.get("id", str(number)),
                category=item.get("category", ""),
                expected=expected,
                prompt=prompt,
                image=item.get("image", ""),
                answer=item.get("answer", ""),
            )
        )
        lines.append(item)
    if not records:
        raise ValueError(f"{path}: no answers; write one JSON object a line with a 'response'")
    return lines, records


def judge_file(
    input: Path,
    output: Path,
    judge: Literal["keyword", "refusal-rules", "refusal-model", "http", "hf"] = "refusal-rules",
    http: HttpJudgeSettings = HttpJudgeSettings(),  # noqa: B008 (frozen dataclass)
    hf: HFJudgeSettings | None = None,
) -> dict[str, Any]:
    """Judge every answer of `input`; write them with their verdicts to `output`.

    Args:
        input: a JSONL file of answers (see the module docstring for the fields).
        output: where the answers go back, each with `verdict` and `judge`.
        judge: `keyword` (the paper's reward rule), `refusal-rules`, `refusal-model`, `http` or
            `hf`.
        http: settings of the `http` judge (an OpenAI-compatible endpoint).
        hf: settings of the `hf` judge (its `path` is required when judge is `hf`).

    Returns:
        `{"judge", "counts", "output", "agreement"}`: the verdict counts, and the judge's
        measured agreement with people where it was measured.
    """
    settings = JudgeSettings(kind=judge, http=http, hf=hf)
    lines, records = read_answers(Path(input))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    judge_impl = build_judge(settings, output.parent)
    verdicts = judge_all(judge_impl, records, [item["response"] for item in lines])
    with output.open("w", encoding="utf-8") as handle:
        for item, verdict in zip(lines, verdicts, strict=True):
            row = {**item, "verdict": verdict.label, "judge": verdict.judge}
            if verdict.raw:
                row["judge_output"] = verdict.raw
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    counts = Counter(v.label for v in verdicts)
    return {
        "judge": judge_impl.name,
        "counts": dict(counts.most_common()),
        "output": str(output),
        "agreement": judge_agreement(judge_impl.name),
    }


def summary(result: dict[str, Any]) -> str:
    """The lines printed after judging: counts, then the judge's agreement with people."""
    total = sum(result["counts"].values())
    counts = ", ".join(f"{label} {n}" for label, n in result["counts"].items())
    lines = [f"{result['output']}: {total} answers judged by {result['judge']}: {counts}"]
    for m in result["agreement"]:
        lines.append(
            f"{result['judge']} agrees with people on {m['set']} ({m['split']}, n={m['n']}): "
            f"accuracy {m['accuracy']:.3f}, refusal recall {m['refusal_recall']:.3f}, "
            f"false-refusal rate {m['false_refusal_rate']:.3f}"
        )
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The parser of `judge`'s arguments."""
    parser = ArgumentParser(
        prog="python -m safegrpo_pl judge",
        description="Judge the answers of a JSONL file with one of evaluate's judges.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these keys")
    parser.add_function_arguments(judge_file, fail_untyped=True)
    return parser


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `args` (default: sys.argv), judge, print the counts; returns the result."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.instantiate_classes(parser.parse_args(list(args) if args is not None else None))
    result = judge_file(**{k: v for k, v in vars(config).items() if k != "config"})
    sys.stdout.write(summary(result) + "\n")
    return result
