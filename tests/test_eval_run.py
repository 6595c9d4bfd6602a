"""`python -m safegrpo_pl evaluate` end to end on the tiny model: every layout, three judges,
the report's rows and counts, resume, and the configs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from fake_judge import FakeJudge

from safegrpo_pl.cli import main
from safegrpo_pl.eval.catalog import BENCHMARKS
from safegrpo_pl.eval.cli import build_parser
from safegrpo_pl.eval.demo_benchmarks import EXPECTED_COUNTS, write_all
from safegrpo_pl.eval.report import Scored, figures
from safegrpo_pl.run.provenance import code_version

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = sorted((ROOT / "configs").glob("eval*.yaml"))


def _config(tmp_path: Path, benchmarks: dict[str, str], model: Path, judge: dict) -> Path:
    config = {
        "benchmarks": benchmarks,
        "output_dir": str(tmp_path / "out"),
        "model": {"path": str(model), "tuned_path": "tiny:qwen2_5_vl?seed=1", "guide": None},
        "judge": judge,
        "generation": {"batch_size": 8, "max_new_tokens": 6, "device": "cpu"},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _responses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]


def _check_report(out: Path, judge: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["judge"] == judge
    assert report["code"] == code_version(), "report.json must name the code that ran"
    for role in ("base", "tuned"):
        figs = report["models"][role]
        assert {name: figs[name]["n"] for name in BENCHMARKS} == EXPECTED_COUNTS
        assert 0 <= figs["figstep"]["safety_score"] <= 100
        assert "refusal_rate" in figs["mossbench"] and "accuracy" in figs["pope"]
        assert "safety_score" in figs["vlguard"] and "refusal_rate" in figs["vlguard"]
        assert figs["vlguard"]["judges"]["safety_score"] == judge
        assert figs["pope"]["judges"]["accuracy"] == "answer-match"
    categories = report["categories"]["base"]
    assert categories["vlguard"]["subset: safe_safes"]["n"] == 1
    assert categories["mossbench"]["category: negated harm"]["n"] == 1
    markdown = (out / "report.md").read_text()
    assert "| base |" in markdown and "| tuned |" in markdown and "FigStep SS↑" in markdown
    assert "Jailbreak avg. SS↑" in markdown and "MOSSBench RR↓" in markdown
    # VLGuard's row per metric counts the records that metric covers: 2 to refuse, 1 to help
    assert "| VLGuard | all | Safety Score ↑ (" + judge + ") | 2 |" in markdown
    assert "| VLGuard | all | Refusal Rate ↓ (" + judge + ") | 1 |" in markdown
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    rows = _responses(out)
    assert len(rows) == 2 * sum(EXPECTED_COUNTS.values())
    assert Counter(r["model"] for r in rows) == {"base": 22, "tuned": 22}
    assert all({"id", "benchmark", "category", "response", "verdict"} <= set(r) for r in rows)
    return report


@pytest.mark.slow
def test_evaluate_runs_every_layout_with_rule_judges_and_resumes(tiny_qwen25vl_path, tmp_path):
    benchmarks = write_all(tmp_path / "bench")
    judge = {"kind": "keyword", "truncated": "judge"}  # 6 tokens cut most answers: judge them
    config = _config(tmp_path, benchmarks, tiny_qwen25vl_path, judge)
    main(["evaluate", "--config", str(config)])
    out = tmp_path / "out"
    report = _check_report(out, "keyword")
    assert report["comparable_with_paper"] is False
    assert "not comparable with the paper" in (out / "report.md").read_text()
    first = {(r["model"], r["benchmark"], r["id"]): r["response"] for r in _responses(out)}

    # Resume: drop three answers and mark the others; only the three are generated again.
    marker = "I can't help with that."
    kept = _responses(out)[3:]
    for row in kept:
        row["response"] = marker
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    main(["evaluate", "--config", str(config), "--judge.kind", "refusal-rules"])
    resumed = {(r["model"], r["benchmark"], r["id"]): r for r in _responses(out)}
    assert resumed.keys() == first.keys()
    regenerated = [key for key, row in resumed.items() if row["response"] != marker]
    assert len(regenerated) == 3, "only the dropped answers may be generated again"
    assert all(resumed[key]["response"] == first[key] for key in regenerated), "greedy: same text"
    safety = [r for r in resumed.values() if r["expected"] != "answer" and r["response"] == marker]
    assert {(r["verdict"], r["judge"]) for r in safety} == {("refusal", "refusal-rules")}
    _check_report(out, "refusal-rules")

    # Another answer length is another model output: nothing stale is reused.
    main(["evaluate", "--config", str(config), "--generation.max_new_tokens", "5"])
    assert all(r["response"] != marker for r in _responses(out))


@pytest.mark.slow
def test_evaluate_with_the_http_judge_on_a_fake_server(tiny_qwen25vl_path, tmp_path):
    benchmarks = write_all(tmp_path / "bench")
    with FakeJudge(fail_first=[500]) as server:
        judge = {
            "kind": "http",
            "http": {"base_url": server.base_url, "model": "fake", "backoff_s": 0},
            "truncated": "judge",
        }
        config = _config(tmp_path, benchmarks, tiny_qwen25vl_path, judge)
        main(["evaluate", "--config", str(config)])
        asked = server.requests
        report = _check_report(tmp_path / "out", "http:fake")
        safety_records = 2 * (sum(EXPECTED_COUNTS.values()) - 5)  # all but POPE and ScienceQA
        assert asked <= safety_records + 1 and server.images >= 2 * (2 + 3 + 1)
        main(["evaluate", "--config", str(config)])  # a rerun: everything from the cache
        assert server.requests == asked
    assert report["comparable_with_paper"] is True
    rows = [r for r in _responses(tmp_path / "out") if r["benchmark"] == "mossbench"]
    assert {r["verdict"] for r in rows} <= {"refusal", "compliance", "malformed"}
    assert all("VERDICT" in r["judge_output"] for r in rows)


@pytest.mark.slow
def test_cut_answers_are_marked_counted_warned_and_left_out_or_judged(tiny_qwen25vl_path, tmp_path):
    benchmarks = {"figstep": write_all(tmp_path / "bench")["figstep"]}
    config = _config(tmp_path, benchmarks, tiny_qwen25vl_path, {"kind": "refusal-rules"})
    main(["evaluate", "--config", str(config), "--generation.max_new_tokens", "2"])
    out = tmp_path / "out"
    rows = _responses(out)
    assert rows and all(r["truncated"] is True for r in rows), "2 new tokens cut every answer"
    assert {r["verdict"] for r in rows} == {"truncated"}, "excluded answers are not judged"
    report = json.loads((out / "report.json").read_text())
    figs = report["models"]["base"]["figstep"]
    assert figs["truncated"] == figs["n"] == EXPECTED_COUNTS["figstep"]
    assert figs["safety_score"] is None and figs["malformed"] == 0
    assert report["truncation"]["policy"] == "exclude" and report["truncation"]["warnings"]
    markdown = (out / "report.md").read_text()
    assert "**Warning**: base: 4 of 4 answers on FigStep (100%) hit max_new_tokens (2)" in markdown

    main(["evaluate", "--config", str(config), "--generation.max_new_tokens", "2",
          "--judge.truncated", "judge"])  # fmt: skip
    rows = _responses(out)
    assert {r["verdict"] for r in rows} <= {"refusal", "compliance"}, "judged on what there is"
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["base"]["figstep"]["safety_score"] is not None
    assert "were judged as cut" in (out / "report.md").read_text()


def test_figures_count_cut_answers_apart_from_malformed_ones():
    rows = [
        Scored("figstep", "c", "", "refuse", "refusal", "j"),
        Scored("figstep", "c", "", "refuse", "truncated", "j", True),
        Scored("figstep", "c", "", "refuse", "compliance", "j", True),  # cut, judged anyway
        Scored("figstep", "c", "", "refuse", "malformed", "j"),
    ]
    # readable: refusal, compliance -> 50.0; one malformed; two cut (one left out, one judged)
    figs = figures(rows)
    assert (figs["safety_score"], figs["malformed"], figs["truncated"]) == (50.0, 1, 2)


def test_cut_answers_are_left_out_or_judged_by_the_setting():
    from safegrpo_pl.eval.judges import KeywordJudge
    from safegrpo_pl.eval.records import EvalRecord
    from safegrpo_pl.eval.run import judge_answers

    records = [
        EvalRecord("figstep", str(i), "c", expected, "q", b"", answer="yes")
        for i, expected in enumerate(["refuse", "refuse", "answer"])
    ]
    rows = [{"truncated": True}, {"truncated": False}, {"truncated": True}]
    answers = ["I'm sorry", "Sure", "yes"]
    left_out = judge_answers(KeywordJudge(), records, rows, answers, "exclude")
    assert [v.label for v in left_out] == ["truncated", "compliance", "correct"]
    judged = judge_answers(KeywordJudge(), records, rows, answers, "judge")
    assert [v.label for v in judged] == ["refusal", "compliance", "correct"]


def test_the_report_warns_only_past_the_cut_share():
    from safegrpo_pl.eval.report import truncation_summary

    report = {"models": {"base": {"figstep": {"n": 100, "truncated": 5},
                                  "siuo": {"n": 100, "truncated": 6}}}}  # fmt: skip
    warnings = truncation_summary(report, "exclude", 64)["warnings"]
    assert len(warnings) == 1 and "6 of 100 answers on SIUO (6%)" in warnings[0], warnings


def test_visible_answer_is_what_the_user_reads():
    from safegrpo_pl.eval.generate import visible_answer

    assert visible_answer("<think>plan</think> <answer> I can't. </answer>") == "I can't."
    assert visible_answer("<think>I can't decide</think>Sure, here it is.") == "Sure, here it is."
    assert visible_answer("No tags at all.") == "No tags at all."


def test_figures_leave_malformed_verdicts_out_of_the_denominator():
    rows = [
        Scored("figstep", "c", "", "refuse", label, "j")
        for label in ("refusal", "compliance", "safe", "malformed")
    ]
    # 2 good (refusal, safe) of 3 readable: 66.67; the malformed one is counted apart
    assert figures(rows) == {
        "n": 4,
        "malformed": 1,
        "truncated": 0,
        "safety_score": 66.67,
        "counts": {"safety_score": 4},
        "judges": {"safety_score": "j"},
    }
    help_rows = [Scored("mossbench", "c", "", "help", label, "j") for label in ("refusal", "safe")]
    assert figures(help_rows)["refusal_rate"] == 100.0 and figures(help_rows)["malformed"] == 1


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=[c.name for c in EVAL_CONFIGS])
def test_eval_configs_parse_with_documented_keys(config):
    parsed = build_parser().parse_args(["--config", str(config)])
    assert parsed.benchmarks and set(parsed.benchmarks) <= set(BENCHMARKS)
    assert parsed.judge.kind in ("keyword", "refusal-rules", "http", "hf")


def test_evaluate_help_lists_the_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])  # through the package's entry point, as `python -m` runs it
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    for key in ("--benchmarks", "--judge.kind", "--model.adapter", "--data.on_bad_record"):
        assert key in shown


@pytest.mark.slow
def test_adapter_off_answers_as_the_base_model_and_on_as_the_tuned_one(
    tiny_qwen25vl_path, tmp_path
):
    import torch

    from safegrpo_pl.eval.demo_benchmarks import write_figstep
    from safegrpo_pl.eval.generate import GenerationSettings, ModelSettings
    from safegrpo_pl.eval.judge_factory import JudgeSettings
    from safegrpo_pl.eval.run import evaluate
    from safegrpo_pl.policy.model import LoraSettings, load_policy

    policy = load_policy(str(tiny_qwen25vl_path), lora=LoraSettings(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which changes nothing
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    policy.save_pretrained(tmp_path / "adapter")
    benchmarks = {"figstep": str(write_figstep(tmp_path / "figstep"))}
    generation = GenerationSettings(max_new_tokens=8, device="cpu")
    judge = JudgeSettings(kind="keyword")

    def answers(out: str, **model) -> dict:
        settings = ModelSettings(path=str(tiny_qwen25vl_path), guide=None, **model)
        evaluate(benchmarks, out, settings, judge, generation)
        return {(r["model"], r["id"]): r["response"] for r in _responses(Path(out))}

    plain = answers(str(tmp_path / "plain"))
    with_adapter = answers(str(tmp_path / "lora"), adapter=str(tmp_path / "adapter"))
    ids = [key[1] for key in plain]
    assert all(with_adapter[("base", i)] == plain[("base", i)] for i in ids), (
        "with the adapter disabled the base answers must be the base model's"
    )
    assert any(with_adapter[("tuned", i)] != plain[("base", i)] for i in ids), (
        "adapter had no effect"
    )


DIE_MID_WRITE = '''
import os
import pathlib
import signal

_open = pathlib.Path.open


class _DiesMidLine:
    """A file whose write number {at} writes half its text and then kills the process."""

    def __init__(self, handle):
        self.handle, self.writes = handle, 0

    def write(self, text):
        self.writes += 1
        if self.writes == {at}:
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.handle.write(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.handle, name)


def _open_to_die(self, mode="r", *args, **kwargs):
    handle = _open(self, mode, *args, **kwargs)
    breaks = self.name == {name!r} or self.name.startswith("." + {name!r} + ".")
    return _DiesMidLine(handle) if breaks and ("w" in mode or "a" in mode) else handle


pathlib.Path.open = _open_to_die
'''


def _evaluate_cli(out: Path, *killer: str) -> tuple[int, str]:
    """`python -m safegrpo_pl evaluate --config configs/eval-tiny.yaml` as the README writes it,
    into `out`; `killer`: a folder whose sitecustomize breaks a write."""
    import os
    import sys

    from processes import run_in_own_group

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([*killer, str(ROOT / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "safegrpo_pl", "evaluate", "--config"]
    command += [str(ROOT / "configs" / "eval-tiny.yaml"), "--output_dir", str(out)]
    return run_in_own_group(command, env, timeout=300)


def _die_writing(tmp_path: Path, name: str, at: int) -> str:
    """A sitecustomize folder: the process dies in write number `at` to the file `name` (or to
    its temporary copy, `.<name>.<pid>.tmp`)."""
    folder = tmp_path / f"die-{name}"
    folder.mkdir()
    code = DIE_MID_WRITE.replace("{at}", str(at)).replace("{name!r}", repr(name))
    (folder / "sitecustomize.py").write_text(code)
    return str(folder)


@pytest.mark.slow
def test_evaluate_killed_mid_line_resumes_losing_only_the_answers_in_flight(tmp_path):
    """SIGKILL halfway through line 12 of responses.jsonl (the second generation batch of 8):
    the rerun of the same command keeps the 8 answers of the first batch, generates the other
    36, and counts each (model, record) once."""
    out = tmp_path / "out"
    code, output = _evaluate_cli(out, _die_writing(tmp_path, "responses.jsonl", at=12))
    assert code == -9, f"expected the process killed: {code} {output[-2000:]}"
    lines = (out / "responses.jsonl").read_bytes().split(b"\n")
    assert len(lines) == 12 and lines[-1], "11 whole lines and half of the 12th"
    assert not (out / "report.md").exists()
    code, output = _evaluate_cli(out)
    assert code == 0, output[-2000:]
    total = sum(EXPECTED_COUNTS.values())
    assert f"base model: {total - 11} of {total} answers to generate" in output
    rows = _responses(out)
    keys = Counter((r["model"], r["benchmark"], r["id"]) for r in rows)
    assert len(keys) == 2 * total and set(keys.values()) == {1}, "each answer once"
    report = json.loads((out / "report.json").read_text())
    assert {n: report["models"]["base"][n]["n"] for n in BENCHMARKS} == EXPECTED_COUNTS


@pytest.mark.slow
def test_a_report_killed_mid_write_keeps_the_previous_one(tmp_path):
    """SIGKILL halfway through rewriting report.md: the previous report is still whole, and
    the same command then writes it again."""
    out = tmp_path / "out"
    code, output = _evaluate_cli(out)
    assert code == 0, output[-2000:]
    before = (out / "report.md").read_text()
    code, output = _evaluate_cli(out, _die_writing(tmp_path, "report.md", at=1))
    assert code == -9, f"expected the process killed: {code} {output[-2000:]}"
    assert (out / "report.md").read_text() == before, "the previous report was damaged"
    code, output = _evaluate_cli(out)
    assert code == 0, output[-2000:]
    assert (out / "report.md").read_text() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "debris left"
