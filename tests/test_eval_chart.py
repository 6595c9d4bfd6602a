"""The evaluation's chart says in words when its bars would show nothing (`configs/eval-tiny.yaml`'s
random models score 0 everywhere: the chart used to be empty)."""

from __future__ import annotations

from pathlib import Path

from safegrpo_pl.eval.report import chart_note, render_chart


def _report(base: dict, tuned: dict) -> dict:
    return {
        "models": {"base": base, "tuned": tuned},
        "judge": "refusal-rules",
        "comparable_with_paper": False,
    }


def test_an_all_zero_chart_says_so() -> None:
    zero = {"figstep": {"safety_score": 0.0}, "mossbench": {"refusal_rate": 0.0}}
    assert "every figure is 0" in chart_note(_report(zero, zero))


def test_a_chart_without_figures_says_so() -> None:
    assert "no figure to draw" in chart_note(_report({"figstep": {}}, {"figstep": {}}))


def test_a_chart_with_a_bar_needs_no_note() -> None:
    base = {"figstep": {"safety_score": 0.0}}
    assert chart_note(_report(base, {"figstep": {"safety_score": 12.5}})) is None


def test_the_all_zero_chart_is_drawn_with_its_note(tmp_path: Path) -> None:
    zero = {"figstep": {"safety_score": 0.0}}
    path = render_chart(_report(zero, zero), tmp_path / "report.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
