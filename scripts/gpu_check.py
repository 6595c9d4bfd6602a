"""What a CPU cannot show, in one command: a few `fit` steps of a real-size model on one GPU.

    PYTHONPATH=src python scripts/gpu_check.py --out gpu_check.json        # one GPU; UNVERIFIED
    PYTHONPATH=src python scripts/gpu_check.py --cpu --out cpu_check.json  # tiny sizes, CPU

The GPU mode has never run: no GPU was lent while it was written. The CPU mode runs the same
code at tiny sizes in the test suite (tests/test_gpu_check.py), so it cannot rot.

GPU mode: Qwen3-VL-4B with random weights, built from tests/assets/qwen3-vl-4b-config.json (no
hub; LM head untied from the embeddings, as FSDP needs), with the tiny model's tokenizer and an
image processor that makes every image 1,024 tokens. It runs configs/qwen3-vl-4b.yaml on one
device: bf16-mixed, gradient checkpointing, G 8, 4 prompts, rollout chunk 4, 512 new tokens.
CPU mode runs the same configs with the tiny Qwen3-VL, float32 and short lengths.

Each run is two `fit` steps through the command line's own class, the second profiled
(`plan_check.PeakProbe`): LoRA; all weights; QLoRA (configs/qwen-4bit.yaml, GPU only); and
FSDP2 over one device (configs/qwen-full.yaml with LoRA). The report holds, per run:
- the peak per phase, measured, beside `plan`'s estimate of the same arguments (within 25%?);
- decode tokens/s of the first step's sampling (every completion at full length; eager only:
  there is no compiled decode step yet);
- the first mini-batch's importance ratio: the training forward's log-probs (train mode,
  micro-batches, with grad) against the old-policy pass's (eval mode, chunked, no grad) on one
  rollout, weights unchanged, so 1 up to rounding.
A run that `plan` says cannot fit the device is reported as skipped. Exit status 1 when a run
failed or a measured phase is more than 25% away from `plan`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from lightning import Callback
from plan_check import ROOT, measure_cli, plan_beside

from safegrpo_pl.plan.cli import config_dims, read_config, run_shape
from safegrpo_pl.plan.memory import GIB, estimate
from safegrpo_pl.policy.tiny_models import resolve_model_path
from safegrpo_pl.rl.grpo import completion_rows, prompt_chunks

TINY = "tiny:qwen3_vl?hidden_size=128&num_layers=4"
COMMON = {
    "trainer.devices": "1",
    "trainer.max_steps": "2",
    "trainer.callbacks": "[]",
    "trainer.logger": "false",
    "trainer.enable_checkpointing": "false",
    "trainer.enable_progress_bar": "false",
    "trainer.enable_model_summary": "false",
    "trainer.limit_val_batches": "0",
    "data.dataset": "demo",
    "data.num_workers": "0",
    "data.eval_batch_size": "2",
    "data.demo.num_val": "2",
    "data.demo.num_test": "2",
    "model.micro_batch_size": "1",
}
SIZES = {
    "gpu": {
        "trainer.accelerator": "gpu",
        "model.group_size": "8",
        "data.batch_size": "4",
        "model.mini_batch_size": "4",
        "model.rollout_micro_batch_size": "4",
        "model.sampling.max_new_tokens": "512",
        "data.demo.num_train": "8",
    },
    "cpu": {
        "trainer.accelerator": "cpu",
        "trainer.precision": "32-true",
        "model.policy.dtype": "float32",
        "model.group_size": "4",
        "data.batch_size": "2",
        "model.mini_batch_size": "2",
        "model.rollout_micro_batch_size": "1",
        "model.sampling.max_new_tokens": "16",
        "data.guide": "null",
        "data.demo.num_train": "4",
    },
}
LORA = "{r: 64, alpha: 128, dropout: 0.0}"
# run -> (configs on top of configs/qwen3-vl-4b.yaml, settings that differ, modes it runs in)
RUNS: dict[str, tuple[list[str], dict[str, str], tuple[str, ...]]] = {
    "lora": ([], {"trainer.strategy": "auto"}, ("gpu", "cpu")),
    "full": ([], {"trainer.strategy": "auto", "model.policy.lora": "null"}, ("gpu", "cpu")),
    "qlora": (["configs/qwen-4bit.yaml"], {"trainer.strategy": "auto"}, ("gpu",)),
    "fsdp2-one-device": (
        ["configs/qwen-full.yaml"],
        {"trainer.strategy.init_args.data_parallel_size": "1", "model.policy.lora": LORA},
        ("gpu", "cpu"),
    ),
}


class FirstStepFigures(Callback):
    """Before the first step: the importance ratio of the training forward against the old
    pass on one rollout; during it: the decode speed of its sampling."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx != 0:
            return
        self.figures["importance_ratio"] = first_ratio(pl_module, batch)
        sample = pl_module.sample

        def timed(*args: Any, **kwargs: Any) -> Any:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            rollout = sample(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            if "decode_tokens_per_s" not in self.figures:
                tokens = int(rollout.lengths.sum())
                self.figures["decode_tokens_per_s"] = tokens / seconds
                self.figures["decode"] = {"tokens": tokens, "seconds": seconds}
            return rollout

        pl_module.sample = timed


def first_ratio(module: Any, batch: Any) -> dict[str, float]:
    """exp(training log-probs - old log-probs) over one rollout's tokens, weights unchanged."""
    runner, temperature = module.runner, module.sampling.temperature
    rollout = module.sample(batch, module.group_size, module.sampling)
    old = runner.frozen_logprobs(batch, rollout, reference=False, temperature=temperature)
    ratios = []
    for micro in prompt_chunks(len(batch), module.micro_batch_size):
        rows = completion_rows(micro, rollout.group_size)
        ids, mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
        with torch.enable_grad():
            new = runner.logprobs(
                module.policy,
                batch.select(micro),
                ids,
                mask,
                temperature,
                recompute_head=module.recompute_head,
            ).detach()
        ratios.append(torch.exp(new - old[rows])[mask.bool()])
    ratio = torch.cat(ratios).double()
    return {
        "mean": float(ratio.mean()),
        "min": float(ratio.min()),
        "max": float(ratio.max()),
        "max_abs_deviation": float((ratio - 1).abs().max()),
        "tokens": int(ratio.numel()),
    }


def random_qwen3_vl_4b(out: Path) -> str:
    """Qwen3-VL-4B with random bf16 weights from its config, beside the tiny model's tokenizer
    (the config's special-token ids follow it) and a processor that makes images 1,024 tokens."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    if (out / "config.json").exists():
        return str(out)
    tiny = Path(resolve_model_path("tiny:qwen3_vl"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = AutoConfig.from_pretrained(ROOT / "tests" / "assets" / "qwen3-vl-4b-config.json")
    config.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    config.vision_end_token_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.text_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = [
        config.text_config.eos_token_id,
        config.text_config.pad_token_id,
    ]
    model.save_pretrained(out)
    side = 1024  # 64 x 64 patches of 16, merged 2 x 2: 1,024 tokens per image
    Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        min_pixels=side * side,
        max_pixels=side * side,
    ).save_pretrained(out)
    return str(out)


def fit_args(mode: str, run: str, model: str, root: Path) -> list[str]:
    """The `fit` arguments of one run."""
    configs, settings, _ = RUNS[run]
    args = [f"--config={ROOT / name}" for name in ["configs/qwen3-vl-4b.yaml", *configs]]
    values = {**COMMON, **SIZES[mode], **settings, "model.policy.name_or_path": model}
    values["trainer.default_root_dir"] = str(root)
    return args + [f"--{key}={value}" for key, value in values.items()]


def planned_peak(args: list[str]) -> float:
    """`plan`'s peak in bytes for `fit ARGS` at the configured lengths."""
    config = read_config(args)
    return estimate(config_dims(config), run_shape(config)).peak


def check_run(mode: str, run: str, model: str, out: Path) -> dict[str, Any]:
    """One run: measured beside planned, decode speed, first ratio; or why it was skipped."""
    folder = out / run
    folder.mkdir(parents=True, exist_ok=True)
    args = fit_args(mode, run, model, folder)
    if mode == "gpu":
        device = torch.cuda.get_device_properties(0).total_memory
        peak = planned_peak(args)
        if peak > 0.95 * device:
            return {"skipped": f"plan: {peak / GIB:.1f} GiB > 95% of {device / GIB:.1f} GiB"}
    figures = FirstStepFigures()
    start = time.perf_counter()
    measure_cli(args, folder, callbacks=[figures])
    row = plan_beside(args, folder, run)
    row["phases_within_25_percent"] = {
        name: 0.75 <= planned / measured <= 1.25
        for name, (planned, measured) in row["phases_mib"].items()
        if measured > 0
    }
    row.update(figures.figures, seconds=time.perf_counter() - start)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON report")
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--work", default=None, help="folder for models and runs (a temp one)")
    parser.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    mode = "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the tiny CPU check", file=sys.stderr)
        return 2
    if mode == "cpu":
        torch.set_num_threads(1)
    work = Path(args.work or Path(args.out).with_suffix(".work"))
    model = TINY if mode == "cpu" else random_qwen3_vl_4b(work / "qwen3-vl-4b-random")
    report: dict[str, Any] = {
        "mode": mode,
        "device": torch.cuda.get_device_name(0) if mode == "gpu" else "cpu",
        "torch": torch.__version__,
        "model": model,
        "runs": {},
    }
    failed = False
    for run in args.runs.split(","):
        if mode not in RUNS[run][2]:
            report["runs"][run] = {"skipped": f"{run} needs a GPU"}
            continue
        try:
            row = check_run(mode, run, model, work)
        except Exception:  # one broken run must not hide the others' figures
            row = {"error": traceback.format_exc(limit=20)}
        report["runs"][run] = row
        failed |= "error" in row or not all(row.get("phases_within_25_percent", {}).values())
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    for run, row in report["runs"].items():
        ratio = row.get("importance_ratio", {}).get("max_abs_deviation", math.nan)
        state = row.get("skipped") or ("ERROR" if "error" in row else "")
        print(
            f"{run:<18} peak plan/measured {row.get('ratio', math.nan):5.2f}  "
            f"decode {row.get('decode_tokens_per_s', math.nan):9.1f} tok/s  "
            f"|ratio - 1| <= {ratio:.2e}  {state}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
