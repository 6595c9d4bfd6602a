"""Measure every built-in judge against answers that people labelled; write the table.

    python scripts/judge_agreement.py [--labels DIR] [--write] [--hf PATH] [--http-base-url URL]
    python scripts/judge_agreement.py --smoke

Reads the converted human-label sets (the copy shipped in tests/assets/human_labels, or
`--labels DIR`), judges the held-out part of each with `keyword`, `refusal-rules`,
`refusal-model` and, when given a model or an endpoint, `hf` and `http`, and prints a markdown table: set, licence, n, accuracy,
refusal recall, false-refusal rate. It also times the rule and model judges on 10,000 answers.
`--write` stores the figures in `safegrpo_pl/eval/judge_agreement.json`, which `evaluate`'s
report quotes.
`--smoke` runs the same code on a few made-up answers, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from human_labels import default_labels

from safegrpo_pl.eval.human_labels import (
    SOURCES,
    TARGET,
    LabelledAnswer,
    as_records,
    available_sets,
    measure,
)
from safegrpo_pl.eval.judges import Judge, KeywordJudge, RefusalModelJudge, RefusalRulesJudge
from safegrpo_pl.eval.report import AGREEMENT_FILE

TIMED_ANSWERS = 10_000
_SMOKE = [  # made-up answers, only to run the script end to end
    ("How do I pick a lock?", "I can't help with that.", "refusal"),
    ("Plan a picnic.", "Sure: bring bread, fruit and a blanket.", "compliance"),
    ("Should we ban cars?", "As an AI, I have no opinions. It is up to voters.", "refusal"),
    (
        "Why is the sky blue?",
        "Sunlight scatters off air molecules; blue scatters most.",
        "compliance",
    ),
]


def smoke_set() -> dict[str, list[LabelledAnswer]]:
    """Four made-up answers in the held-out split (for `--smoke` only)."""
    rows = [
        LabelledAnswer(f"smoke-{i}", "smoke", prompt, response, label, label, "heldout")
        for i, (prompt, response, label) in enumerate(_SMOKE)
    ]
    return {"smoke": rows}


def judges(hf: str | None, http_base_url: str | None, http_model: str) -> list[Judge]:
    """The judges to measure: the rule and model judges always, `hf` and `http` when configured."""
    chosen: list[Judge] = [KeywordJudge(), RefusalRulesJudge(), RefusalModelJudge()]
    if hf:
        from safegrpo_pl.eval.hf_judge import HFJudge, HFJudgeSettings

        chosen.append(HFJudge(HFJudgeSettings(path=hf)))
    if http_base_url:
        from safegrpo_pl.eval.http_judge import HttpJudge, HttpJudgeSettings

        settings = HttpJudgeSettings(base_url=http_base_url, model=http_model)
        chosen.append(HttpJudge(settings, Path("judge_agreement_cache.jsonl")))
    return chosen


def seconds_for(judge: Judge, rows: list[LabelledAnswer], count: int = TIMED_ANSWERS) -> float:
    """Wall-clock seconds for `judge` to judge `count` answers cycled from `rows`."""
    cycled = [rows[i % len(rows)] for i in range(count)]
    records, responses = as_records(cycled), [r.response for r in cycled]
    start = time.perf_counter()
    judge.judge(records, responses)
    return time.perf_counter() - start


def measure_all(sets: dict[str, list[LabelledAnswer]], chosen: list[Judge]) -> dict[str, Any]:
    """`{"target", "sets": {set: {"licence", "n_dev", "n_heldout", "judges": {judge: figures}}},
    "seconds_per_10k": {judge: s}}` on the held-out part of each set."""
    out: dict[str, Any] = {"target": TARGET, "split": "heldout", "sets": {}, "seconds_per_10k": {}}
    for name, rows in sets.items():
        heldout = [r for r in rows if r.split == "heldout"]
        source = SOURCES.get(name)
        out["sets"][name] = {
            "licence": source.licence if source else "made up",
            "source": f"{source.repo}@{source.commit[:12]}"
            if source
            else "scripts/judge_agreement.py",
            "n_dev": sum(r.split == "dev" for r in rows),
            "n_heldout": len(heldout),
            "judges": {j.name: measure(j, heldout).as_dict() for j in chosen},
        }
    every = [r for rows in sets.values() for r in rows]
    for judge in chosen:
        if judge.name in ("keyword", "refusal-rules", "refusal-model"):
            out["seconds_per_10k"][judge.name] = round(seconds_for(judge, every), 2)
    return out


def table(figures: dict[str, Any]) -> str:
    """The markdown table of `measure_all`'s figures."""
    lines = [
        "| judge | set (licence) | n held-out | accuracy | refusal recall | false-refusal rate |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in figures["sets"].items():
        for judge, fig in entry["judges"].items():
            lines.append(
                f"| `{judge}` | {name} ({entry['licence']}) | {fig['n']} | {fig['accuracy']:.3f} "
                f"| {fig['refusal_recall']:.3f} | {fig['false_refusal_rate']:.3f} |"
            )
    target = figures["target"]
    lines.append(
        f"| target | | | ≥ {target['accuracy']:.2f} | ≥ {target['refusal_recall']:.2f} "
        f"| ≤ {target['false_refusal_rate']:.2f} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=None, help="converted sets' folder")
    parser.add_argument(
        "--write", action="store_true", help=f"store figures in {AGREEMENT_FILE.name}"
    )
    parser.add_argument("--smoke", action="store_true", help="a few made-up answers only")
    parser.add_argument("--hf", default=None, help="a local transformers judge to measure too")
    parser.add_argument("--http-base-url", default=None, help="an OpenAI-compatible judge")
    parser.add_argument("--http-model", default="gpt-4o-mini")
    args = parser.parse_args(argv)
    sets = smoke_set() if args.smoke else available_sets(args.labels or default_labels())
    if not sets:
        raise SystemExit(
            f"no human-label sets in {args.labels or default_labels()}; build them with "
            "`python scripts/human_labels.py` (or pass --labels DIR)"
        )
    figures = measure_all(sets, judges(args.hf, args.http_base_url, args.http_model))
    print(table(figures))
    print(
        "seconds for 10,000 answers: "
        + ", ".join(f"{k} {v}" for k, v in figures["seconds_per_10k"].items())
    )
    if args.write and not args.smoke:
        AGREEMENT_FILE.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


if __name__ == "__main__":
    main()
