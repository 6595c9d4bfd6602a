"""Decode tokens/s of each `model.sampling.decode` mode, compile time included (docs: README).

    PYTHONPATH=src python scripts/decode_speed.py [--reps 3] [--json out.json]
    PYTHONPATH=src python scripts/decode_speed.py --smoke --modes growing,static

Cases (every completion runs to max_new_tokens: end-of-sequence suppressed):
- demo: the demo's model and rollout (configs/tiny.yaml: 32 prompts x G 4, 64 new tokens, no
  guide, one chunk);
- bench: the bench's model and rollout (`scripts/bench.py`: the tiny text-only Qwen3 of hidden
  256 and 2 layers, 4 prompts x G 8, 64 new tokens, the full guide, chunks of 2 prompts).

For each case, in one process on one thread: the first rollout of each mode (for "compiled",
compiling included: with an empty inductor cache, as a first run pays it, then once more after
`torch._dynamo.reset()` with the cache now on disk, as every later process pays it), then
`--reps` rounds of every mode in turn. Steady figures are medians of the rounds, in this
process's CPU seconds (`time.process_time`, which a shared machine's load moves less than wall
time); compile figures are wall seconds (inductor compiles in worker processes). Greedy and
sampled tokens of every mode are compared with "growing" from the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_api as api
from _bench_jobs import demo_prompts

from safegrpo_pl.policy.tiny_models import TinyModelSpec, build_tiny_model, resolve_model_path
from safegrpo_pl.rollout.sampling import SamplingSettings, sample_groups


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a `tiny:` name, or "bench" (the bench's tiny text Qwen3, built here)
    prompts: int
    group_size: int
    max_new_tokens: int
    guide: str | None
    chunk_size: int | None


CASES = (
    Case("demo", "tiny:qwen2_5_vl?hidden_size=128&num_layers=4", 32, 4, 64, None, None),
    Case("bench", "bench", 4, 8, 64, "default", 2),
)
SMOKE = (Case("smoke", "tiny:qwen3_text", 2, 2, 4, None, None),)
MODES = ("growing", "static", "compiled")


def _model_path(case: Case, workdir: Path) -> str:
    if case.model != "bench":
        return resolve_model_path(case.model)
    folder = workdir / "bench-model"
    spec = TinyModelSpec(arch="qwen3_text", hidden_size=256, num_layers=2, seed=0)
    build_tiny_model(folder, corpus=api.demo_corpus(), spec=spec)
    return str(folder)


def _rollout(policy: Any, batch: Any, case: Case, token_args: dict, mode: str, greedy: bool):
    settings = SamplingSettings(
        max_new_tokens=case.max_new_tokens, decode=mode, do_sample=not greedy
    )
    return sample_groups(
        policy,
        batch,
        group_size=case.group_size,
        settings=settings,
        generator=torch.Generator().manual_seed(0),
        chunk_size=case.chunk_size,
        **token_args,
    )


def _timed(run: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(case: Case, modes: tuple[str, ...], reps: int, workdir: Path) -> dict[str, Any]:
    """One case's figures (see the module doc)."""
    path = _model_path(case, workdir)
    encoder = api.PromptEncoder.from_pretrained(path, guide=case.guide)
    batch = encoder.encode(demo_prompts(case.prompts))
    policy = api.load_policy(path, dtype="float32").eval()
    ids = api.DecodeIds.of(encoder.tokenizer, policy).never_ending()
    token_args = {"tokenizer": encoder.tokenizer, **ids.sampling_kwargs()}
    tokens = case.prompts * case.group_size * case.max_new_tokens
    first: dict[str, float] = {}
    same: dict[str, dict[str, bool]] = {}
    reference = {
        greedy: _rollout(policy, batch, case, token_args, "growing", greedy)
        for greedy in (True, False)
    }
    for mode in modes:
        rollout, first[mode], _ = _timed(
            lambda m=mode: _rollout(policy, batch, case, token_args, m, False)
        )
        if mode == "compiled":
            torch._dynamo.reset()  # the in-memory graphs go; inductor's on-disk cache stays
            _, first["compiled_warm_cache"], _ = _timed(
                lambda: _rollout(policy, batch, case, token_args, "compiled", False)
            )
        greedy = _rollout(policy, batch, case, token_args, mode, True)
        same[mode] = {
            "sampled": torch.equal(rollout.completion_ids, reference[False].completion_ids),
            "greedy": torch.equal(greedy.completion_ids, reference[True].completion_ids),
        }
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(reps):
        for mode in modes:
            _, _, seconds = _timed(
                lambda m=mode: _rollout(policy, batch, case, token_args, m, False)
            )
            cpu[mode].append(seconds)
    steady = {mode: statistics.median(values) for mode, values in cpu.items()}
    rows = {}
    for mode in modes:
        row = {
            "steady_cpu_s": round(steady[mode], 4),
            "tokens_per_s": round(tokens / steady[mode]),
            "first_rollout_wall_s": round(first[mode], 2),
            "same_tokens_as_growing": same[mode],
        }
        if mode == "compiled":
            saved = steady["growing"] - steady[mode]
            compile_s = first[mode] - steady[mode]
            warm = first["compiled_warm_cache"] - steady[mode]
            row.update(
                compile_s_empty_cache=round(compile_s, 1),
                compile_s_warm_cache=round(warm, 1),
                rollouts_to_pay_back=round(compile_s / saved) if saved > 0 else None,
                rollouts_to_pay_back_warm=round(warm / saved) if saved > 0 else None,
            )
        rows[mode] = row
    return {"case": case.name, "completion_tokens": tokens, "modes": rows}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated")
    parser.add_argument("--case", choices=[c.name for c in CASES], help="one case only")
    parser.add_argument("--smoke", action="store_true", help="a tiny case, one rep")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    modes = tuple(args.modes.split(","))
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; expected some of {', '.join(MODES)}")
    torch.set_num_threads(1)
    cases = SMOKE if args.smoke else [c for c in CASES if args.case in (None, c.name)]
    reps = 1 if args.smoke else args.reps
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # start empty
        for case in cases:
            result = measure(case, modes, reps, Path(tmp))
            results.append(result)
            print(f"{case.name}: {result['completion_tokens']} completion tokens per rollout")
            for mode, row in result["modes"].items():
                print(f"  {mode:9s} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
