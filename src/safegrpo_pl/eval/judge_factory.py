"""Which judge a run uses: its settings (a config section) and the judge they build."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safegrpo_pl.eval.hf_judge import HFJudgeSettings
from safegrpo_pl.eval.http_judge import HttpJudgeSettings
from safegrpo_pl.eval.judges import Judge, KeywordJudge, RefusalModelJudge, RefusalRulesJudge

JUDGE_KINDS: tuple[str, ...] = ("keyword", "refusal-rules", "refusal-model", "http", "hf")


@dataclass(frozen=True)
class JudgeSettings:
    """The judge of a run.

    Attributes:
        kind: `keyword` (the training reward's substring rule; not comparable with the paper),
            `refusal-rules` (the better rule-based refusal detector; not comparable either),
            `refusal-model` (a small model trained on human labels over the rules' signals; not
            comparable either), `http` (an OpenAI-compatible LLM judge, as the paper: see `http`) or `hf` (a local
            transformers judge: see `hf`).
        http: settings of the `http` judge.
        hf: settings of the `hf` judge (its `path` is required when kind is `hf`).
        truncated: what an answer cut at `generation.max_new_tokens` counts as: `exclude` (its
            verdict is `truncated`: counted apart and left out of the figure) or `judge` (judged
            on the text there is). Either way the report counts cut answers per benchmark.
    """

    kind: Literal["keyword", "refusal-rules", "refusal-model", "http", "hf"] = "refusal-rules"
    http: HttpJudgeSettings = field(default_factory=HttpJudgeSettings)
    hf: HFJudgeSettings | None = None
    truncated: Literal["exclude", "judge"] = "exclude"

    def __post_init__(self) -> None:
        if self.kind not in JUDGE_KINDS:
            raise ValueError(f"judge.kind is {self.kind!r}; expected one of {JUDGE_KINDS}")
        if self.truncated not in ("exclude", "judge"):
            raise ValueError(
                f"judge.truncated is {self.truncated!r}; expected 'exclude' or 'judge'"
            )
        if self.kind == "hf" and self.hf is None:
            raise ValueError("judge.kind is 'hf' but judge.hf is not set; give judge.hf.path")


def build_judge(settings: JudgeSettings, output_dir: str | Path) -> Judge:
    """The judge `settings` describe; the `http` judge caches in `output_dir` by default."""
    if settings.kind == "keyword":
        return KeywordJudge()
    if settings.kind == "refusal-rules":
        return RefusalRulesJudge()
    if settings.kind == "refusal-model":
        return RefusalModelJudge()
    if settings.kind == "http":
        from safegrpo_pl.eval.http_judge import HttpJudge

        return HttpJudge(settings.http, Path(output_dir) / "judge_cache.jsonl")
    from safegrpo_pl.eval.hf_judge import HFJudge

    return HFJudge(settings.hf)
