"""`plan`'s estimate beside the measured peak of a real `fit` step on CPU, for small configs.

    PYTHONPATH=src python scripts/plan_check.py           # the table, ~30 s on 2 cores
    PYTHONPATH=src python scripts/plan_check.py --json out.json
    PYTHONPATH=src python scripts/plan_check.py --case lora     # one case (the tests run this)
    PYTHONPATH=src python scripts/plan_check.py --fsdp DIR   # configs/qwen-full.yaml, tiny, 2 procs

What is measured: one training step of `Trainer.fit` (one rollout batch: sampling, reference
and old log-probs, two optimiser steps over two mini-batches, so that AdamW's state exists
during the second training pass, as in every later step). The peak is

    bytes held at the step's start (parameters and buffers of the policy and its reference,
    gradients and AdamW's state; a sharded tensor counts its own shard)
    + the highest count of bytes allocated during the step and not yet freed,

the second term read from torch's own CPU allocator: under `torch.profiler.profile(
profile_memory=True)` every allocation and free through c10's CPU allocator is recorded with
its size and the allocator's running total (`total_allocated` of the profiler's allocation
events). This counts tensors exactly, unlike RSS deltas, which also move with glibc's caching,
Python objects and the profiler's own buffers.

To compare like with like, every completion runs to max_new_tokens (the end-of-sequence token is
made unreachable: the plan assumes that worst case), and the plan is given the prompt length and
image tokens of the batch actually drawn. `--fsdp` runs configs/qwen.yaml + qwen-full.yaml
through `fit`'s command line on two gloo processes, with only sizes and the machine changed, and
profiles its second step (one optimiser step per rollout: AdamW's state exists by then). On a
GPU (`gpu_check.py`) the probe reads `torch.cuda.max_memory_allocated` per phase instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer, seed_everything
from torch._C._profiler import _EventType

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.plan.cli import read_config, run_shape
from safegrpo_pl.plan.dims import model_dims
from safegrpo_pl.plan.memory import RunShape, estimate
from safegrpo_pl.policy.model import LoraSettings, PolicySettings
from safegrpo_pl.rollout import prefix_attention
from safegrpo_pl.rollout.sampling import SamplingSettings
from safegrpo_pl.train.module import SafeGRPOModule

MIB = 2**20


@dataclass(frozen=True)
class Case:
    """One small configuration to measure."""

    name: str
    model: str = "tiny:qwen2_5_vl?hidden_size=128&num_layers=4"
    lora: bool = False
    gradient_checkpointing: bool = False
    batch_size: int = 4
    group_size: int = 4
    mini_batch_size: int = 2
    micro_batch_size: int = 1
    max_new_tokens: int = 32
    rollout_micro_batch_size: int | None = None


CASES = (
    Case("full", lora=False, gradient_checkpointing=False),
    Case("full+ckpt", lora=False, gradient_checkpointing=True),
    Case("lora", lora=True, gradient_checkpointing=False),
    Case("lora+ckpt", lora=True, gradient_checkpointing=True),
)


def _walk(nodes: Any) -> Any:
    for node in nodes:
        yield node
        yield from _walk(node.children)


def _local_bytes(tensors: Any) -> int:
    """Bytes of `tensors` held by this process (a sharded DTensor: its own shard only)."""
    unique = {id(t): t for t in tensors if t is not None}.values()
    local = [t.to_local() if hasattr(t, "to_local") else t for t in unique]
    return sum(t.numel() * t.element_size() for t in local)


class PeakProbe(Callback):
    """Profiles one training step's allocations (the first, or `batch_index`); keeps what the
    plan needs to know. On CPU from the profiler's allocation events; on a GPU,
    `torch.cuda.max_memory_allocated` over each phase (everything allocated on the device).

    Args:
        batch_index: the training batch to profile (1: AdamW's state exists already, for runs
            with one optimiser step per rollout batch).
        out: a folder to write `rank<N>.json` to, for runs on several processes.
    """

    def __init__(self, batch_index: int = 0, out: str | None = None) -> None:
        self.result: dict[str, Any] = {}
        self.batch_index = batch_index
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:  # Every EOS suppressed: no completion ends before max_new_tokens.
            pl_module.runner.decode_ids = pl_module.runner.decode_ids.never_ending()
        if self.result or batch_idx != self.batch_index:
            return
        grid = batch.model_kwargs.get("image_grid_thw")
        self.result["prompt_length"] = int(batch.input_ids.shape[1])
        self.result["image_tokens"] = int(grid.prod(-1).max()) // 4 if grid is not None else 0
        models = [pl_module.policy, *pl_module._reference]
        weights = [t for m in models for t in [*m.parameters(), *m.buffers()]]
        grads = [p.grad for p in pl_module.policy.parameters()]
        moments = [
            t
            for state in trainer.optimizers[0].state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ]
        self.result["held_at_start"] = _local_bytes([*weights, *grads, *moments])
        references = pl_module._reference
        self.result["reference_dtypes"] = sorted(
            {str(p.dtype) for r in references for p in r.parameters()}
        )
        self.windows: list[tuple[str, int, int]] = []
        self.cuda_peaks: dict[str, int] = {}
        self.cuda = pl_module.device.type == "cuda"
        phases = {"sample": "sampling", "frozen_logprobs": "log-probs", "optimise": "training"}
        for method, phase in phases.items():
            setattr(pl_module, method, self._timed(getattr(pl_module, method), phase))
        self.profiler = None
        if not self.cuda:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self.profiler.__enter__()

    def _timed(self, method: Any, phase: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.time_ns()
            try:
                return method(*args, **kwargs)
            finally:
                if self.cuda:
                    torch.cuda.synchronize()
                    peak = max(self.cuda_peaks.get(phase, 0), torch.cuda.max_memory_allocated())
                    self.cuda_peaks[phase] = peak
                self.windows.append((phase, start, time.time_ns()))

        return timed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if "peak" in self.result or batch_idx != self.batch_index:
            return
        if self.cuda:
            self._finish(trainer, pl_module, max(self.cuda_peaks.values()), self.cuda_peaks)
            return
        self.profiler.__exit__(None, None, None)
        events = self.profiler.profiler.kineto_results.experimental_event_tree()
        nodes = [n for n in _walk(events) if n.tag == _EventType.Allocation]
        nodes = sorted(
            (n for n in nodes if str(n.extra_fields.device) == "cpu"), key=lambda n: n.start_time_ns
        )
        # The allocator's running total counts blocks from earlier profiled windows still alive:
        # the window's own start is the first event's total minus its own size.
        first = nodes[0].extra_fields
        offset = self.result["held_at_start"] - (first.total_allocated - first.alloc_size)
        phases: dict[str, int] = {}
        for phase, begin, end in self.windows:
            inside = [
                n.extra_fields.total_allocated for n in nodes if begin <= n.start_time_ns <= end
            ]
            if inside:
                phases[phase] = max(phases.get(phase, 0), offset + max(inside))
        peak = offset + max(n.extra_fields.total_allocated for n in nodes)
        self._finish(trainer, pl_module, peak, phases)

    def _finish(self, trainer, pl_module, peak: int, phases: dict[str, int]) -> None:
        self.result["peak"] = peak
        self.result["phases"] = phases
        if self.out is not None:
            path = Path(self.out) / f"rank{trainer.global_rank}.json"
            path.write_text(json.dumps(self.result))
        else:
            self.result["dims"] = model_dims(pl_module.policy, pl_module.policy.config)


def measure(case: Case, seed: int = 0) -> dict[str, Any]:
    """Run one `fit` step of `case` on CPU; returns the measured peak and what the plan needs."""
    seed_everything(seed, verbose=False)
    extra = {}
    if case.rollout_micro_batch_size is not None:
        extra["rollout_micro_batch_size"] = case.rollout_micro_batch_size
    module = SafeGRPOModule(
        policy=PolicySettings(
            name_or_path=case.model,
            lora=LoraSettings(r=8, alpha=16) if case.lora else None,
            gradient_checkpointing=case.gradient_checkpointing,
        ),
        group_size=case.group_size,
        mini_batch_size=case.mini_batch_size,
        micro_batch_size=case.micro_batch_size,
        kl_coef=0.1,
        sampling=SamplingSettings(max_new_tokens=case.max_new_tokens),
        **extra,
    )
    data = SafeTagDataModule(
        dataset="demo", processor=case.model, guide=None, batch_size=case.batch_size
    )
    probe = PeakProbe()
    trainer = Trainer(
        accelerator="cpu",
        max_steps=2,  # the two optimiser steps of the one rollout batch
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[probe],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    return probe.result


def plan_for(case: Case, measured: dict[str, Any]) -> RunShape:
    """The run shape of `case` as the plan sees it, with the lengths of the measured batch."""
    return RunShape(
        group_size=case.group_size,
        rollout_batch=case.batch_size,
        mini_batch=case.mini_batch_size,
        micro_batch=case.micro_batch_size,
        rollout_chunk=case.rollout_micro_batch_size,
        prompt_length=measured["prompt_length"],
        completion_length=case.max_new_tokens,
        image_tokens=measured["image_tokens"],
        lora=case.lora,
        gradient_checkpointing=case.gradient_checkpointing,
        kl_coef_positive=True,
        old_logprobs=case.batch_size // case.mini_batch_size > 1,
        precision="uniform",
        dtype_bytes=4,
        cpu_sampler=True,
    )


def measure_the_planned_attention() -> None:
    """`plan` estimates a GPU's memory: measure the shared-prompt attention GPUs run (its
    plain-PyTorch tiles, one tile of scores held), not the fused CPU kernel, which holds none.
    For the rest of this process (Lightning's other ranks run this script again)."""
    prefix_attention.FUSED_CPU_KERNEL = False


def check(case: Case) -> dict[str, Any]:
    """Measure `case` and estimate it; returns a row of the table."""
    measure_the_planned_attention()
    start = time.perf_counter()
    measured = measure(case)
    run = plan_for(case, measured)
    plan = estimate(measured["dims"], run)
    return {
        "case": case.name,
        "estimate_mib": plan.peak / MIB,
        "measured_mib": measured["peak"] / MIB,
        "ratio": plan.peak / measured["peak"],
        "peak_phase": plan.peak_phase,
        # The first step samples and scores before AdamW's state exists: compare those phases
        # without it.
        "phases_mib": {
            name: [
                (plan.phase_total(name) - (name != "training") * plan.resident["optimizer state"])
                / MIB,
                measured["phases"].get(name, 0) / MIB,
            ]
            for name in plan.phases
        },
        "prompt_length": run.prompt_length,
        "seconds": time.perf_counter() - start,
        "settings": asdict(case),
    }


# -- FSDP2 on two processes: configs/qwen.yaml + configs/qwen-full.yaml at tiny size -------

ROOT = Path(__file__).resolve().parents[1]
FULL_FINE_TUNING = ("configs/qwen.yaml", "configs/qwen-full.yaml")
# What changes from the paper's full fine-tuning: sizes and the machine. Everything else
# (ModelParallelStrategy, float32 shards, bf16 compute, kl_coef, gradient checkpointing, the
# micro-batch of 1 prompt, the rollout chunk equal to the batch) is the configs' own.
TINY_SIZES = {
    "trainer.accelerator": "cpu",
    "trainer.devices": "2",
    "trainer.strategy.init_args.data_parallel_size": "2",
    "trainer.max_steps": "2",  # the second step is profiled: AdamW's state exists by then
    "trainer.callbacks": "[]",
    "trainer.logger": "false",
    "trainer.enable_checkpointing": "false",
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "trainer.limit_val_batches": "0",
    "model.policy.name_or_path": "tiny:qwen3_vl?hidden_size=128&num_layers=4",
    "model.mini_batch_size": "2",
    "model.rollout_micro_batch_size": "2",
    "model.sampling.max_new_tokens": "32",
    "data.dataset": "demo",
    "data.guide": "null",
    "data.batch_size": "2",
    "data.eval_batch_size": "2",
    "data.num_workers": "0",
    "data.demo.num_train": "8",
    "data.demo.num_val": "2",
    "data.demo.num_test": "2",
}


def fsdp_args(root: Path) -> list[str]:
    """The `fit` arguments of the tiny full fine-tuning run, writing under `root`."""
    args = [f"--config={ROOT / name}" for name in FULL_FINE_TUNING]
    for key, value in {**TINY_SIZES, "trainer.default_root_dir": str(root)}.items():
        args.append(f"--{key}={value}")
    return args


def measure_cli(args: list[str], out: Path, callbacks: Sequence[Callback] = ()) -> Any:
    """`fit ARGS` through the command line's own class, its second training step profiled,
    each process writing `out/rank<N>.json` (several processes: this one and those Lightning
    starts); returns the Trainer."""
    from safegrpo_pl.policy.tiny_models import resolve_model_path
    from safegrpo_pl.run.trainer_cli import SafeGRPOCLI

    measure_the_planned_attention()
    # Built before a second process starts: under torch.distributed, transformers'
    # save_pretrained writes on rank 0 only, so a rank > 0 would publish a folder without weights.
    name = read_config(args).model.policy.name_or_path
    resolve_model_path(name)
    probe = PeakProbe(batch_index=1, out=str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            trainer_defaults={"callbacks": [probe, *callbacks]},
            args=["fit", *args],
        )
    cli.trainer.strategy.barrier()  # every rank's file is written
    return cli.trainer


def plan_beside(args: list[str], out: Path, name: str) -> dict[str, Any]:
    """`plan` of the same `fit` arguments, at the drawn batch's lengths, beside each rank's
    measured peak (`measure_cli`)."""
    from safegrpo_pl.plan.cli import config_dims

    ranks = [json.loads(path.read_text()) for path in sorted(out.glob("rank*.json"))]
    config = read_config(args)
    run = run_shape(
        config,
        image_tokens=max(r["image_tokens"] for r in ranks),
        prompt_length=max(r["prompt_length"] for r in ranks),
    )
    plan = estimate(config_dims(config), run)
    measured = max(r["peak"] for r in ranks)
    return {
        "case": name,
        "estimate_mib": plan.peak / MIB,
        "measured_mib": measured / MIB,
        "measured_mib_per_rank": [r["peak"] / MIB for r in ranks],
        "ratio": plan.peak / measured,
        "peak_phase": plan.peak_phase,
        "phases_mib": {
            name: [plan.phase_total(name) / MIB, max(r["phases"].get(name, 0) for r in ranks) / MIB]
            for name in plan.phases
        },
        "resident_mib": {name: value / MIB for name, value in plan.resident.items()},
        "prompt_length": run.prompt_length,
        "reference_dtypes": sorted({d for r in ranks for d in r["reference_dtypes"]}),
        "settings": asdict(run),
    }


def _print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'case':<12} {'estimate MiB':>13} {'measured MiB':>13} {'ratio':>6}  peak phase")
    for row in rows:
        print(
            f"{row['case']:<12} {row['estimate_mib']:>13.2f} {row['measured_mib']:>13.2f} "
            f"{row['ratio']:>6.2f}  {row['peak_phase']}"
        )
        for name, (est, got) in row["phases_mib"].items():
            print(f"  {name:<10} {est:>13.2f} {got:>13.2f} {est / got if got else 0:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--chunk", type=int, help="model.rollout_micro_batch_size, if it exists")
    parser.add_argument(
        "--case",
        action="append",
        choices=[c.name for c in CASES],
        help="measure only this case (repeatable; default: every case)",
    )
    parser.add_argument(
        "--fsdp", metavar="DIR", help="instead: configs/qwen-full.yaml at tiny size, 2 processes"
    )
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.fsdp:
        out = Path(args.fsdp)
        out.mkdir(parents=True, exist_ok=True)
        fit_args = fsdp_args(out)
        if measure_cli(fit_args, out).global_rank == 0:
            row = plan_beside(fit_args, out, "fsdp2 x2 (qwen-full)")
            _print_rows([row])
            if args.json:
                Path(args.json).write_text(json.dumps(row, indent=2))
        return
    cases = tuple(c for c in CASES if not args.case or c.name in args.case)
    if args.chunk:
        cases = tuple(replace(c, rollout_micro_batch_size=args.chunk) for c in cases)
    rows = [check(case) for case in cases]
    _print_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
