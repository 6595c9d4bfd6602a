"""The benchmark's measurements, each run in a fresh process by `scripts/bench.py`.

`python scripts/_bench_jobs.py JOB.json RESULT.json` runs one job and writes its result. A
fresh process per job makes the peak resident memory (`ru_maxrss`) belong to that job alone.

Jobs:
- `ours`: our `SafeGRPOModule` through a Lightning `Trainer.fit`, timed per step (wall clock
  and process CPU time), with the phase timings the module logs (`scripts/_bench_ours.py`).
- `trl`: TRL's `GRPOTrainer` on the same model, prompts and settings.
- `scaling`: ours at several group sizes and completion lengths, one process.
- `rollout`: shared-prefix sampling (and log-probs) against the naive per-completion path on a
  tiny Qwen2.5-VL with image prompts.
- `refmem`: one short fit of ours, for the peak-memory ratio of kl_coef 0.01 to 0.

Fairness, as implemented here: both trainers train the same folder (tiny text-only Qwen3,
float32, no dropout), on the same demo prompts in the same order (the same chat-templated
string; TRL tokenises it as plain text), with G, prompts per step, completion length,
temperature 1, top-p 1, top-k off, lr, weight decay, gradient clipping, beta and optimiser
steps equal; one optimiser step per rollout (TRL: `steps_per_generation` 1, `num_iterations`
1), token-mean loss (TRL's `dapo`), no gradient checkpointing, no bf16. EOS and the vision
special tokens are suppressed while sampling in both, so every completion has exactly
`max_new_tokens` tokens and the token counts are equal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench_stats as stats

log = logging.getLogger("bench")


def _setup_torch(threads: int, seed: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def _start_job(job: dict[str, Any]) -> tuple[stats.BenchSettings, str, Any]:
    """What every job does first: its settings, torch threads and seed, its model's encoder."""
    import _bench_api as api

    settings = stats.BenchSettings.from_dict(job["settings"])
    _setup_torch(settings.threads, settings.seed)
    path = job["model_path"]
    return settings, path, api.PromptEncoder.from_pretrained(path)


def _training_prompts(settings: stats.BenchSettings, extra_steps: int = 0) -> list[Any]:
    """The records of a timed run: one rollout batch per step, warm-up steps included, and
    `extra_steps` more (the profiled step)."""
    count = settings.prompts_per_step * (settings.total_steps + extra_steps)
    return demo_prompts(count, seed=settings.seed)


class StepProfile:
    """`torch.profiler` around one step (`start`, `stop`); `stop` returns its
    `stats.kernel_seconds`. The step's own timings are not used: profiling slows every op."""

    def __init__(self) -> None:
        self._profiler: Any = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CPU])
        self._profiler.__enter__()

    def stop(self) -> dict[str, float]:
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        own = {e.key: e.self_cpu_time_total / 1e6 for e in profiler.key_averages()}
        return stats.kernel_seconds(own)


def demo_prompts(count: int, *, image_size: int = 64, seed: int = 0) -> list[Any]:
    """The first `count` records of the demo set's train split (deterministic)."""
    import _bench_api as api

    # Typographic images keep the demo's size unless the pictures are larger.
    smallest = api.DemoConfig().typographic_size
    config = api.DemoConfig(
        image_size=image_size, typographic_size=max(smallest, image_size), seed=seed
    )
    return api.make_demo_split("train", count, config)


def trl_safety_reward(
    completions: list[Any],
    image_tag: list[str],
    text_tag: list[str],
    combine_tag: list[str],
    **_: Any,
) -> list[float]:
    """Our rule reward (`safegrpo_pl.core.rewards.safety_reward`) in TRL's reward-function form.

    TRL passes the decoded completions and every extra dataset column as lists, one entry
    per completion; conversational completions arrive as message lists.
    """
    import _bench_api as api

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [
        api.safety_reward(text, image_tag=i, text_tag=t, combine_tag=c)
        for text, i, t, c in zip(texts, image_tag, text_tag, combine_tag, strict=True)
    ]


def suppressed_ids(model_path: str) -> tuple[list[int], list[int]]:
    """(vision special-token ids, EOS ids) of the model at `model_path`: both are suppressed."""
    import _bench_api as api
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generation_config = GenerationConfig.from_pretrained(model_path)
    return api.vision_token_ids(tokenizer), api.eos_token_ids(tokenizer, generation_config)


# -- TRL ------------------------------------------------------------------------------------


def _trl_dataset(path: str, encoder: Any, records: list[Any]) -> Any:
    """The prompts as TRL reads them: the chat-templated string plus the tags of the reward."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    texts = [encoder.prompt_text(r) for r in records]
    tokenizer = AutoTokenizer.from_pretrained(path)
    # TRL tokenises a plain-string prompt with special tokens on: check that adds nothing.
    ours_ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    if tokenizer(texts[0])["input_ids"] != ours_ids:
        raise RuntimeError("TRL would tokenise the prompt differently (special tokens added)")
    return Dataset.from_list(
        [
            {
                "prompt": text,
                "image_tag": r.image_tag,
                "text_tag": r.text_tag,
                "combine_tag": r.combine_tag,
            }
            for text, r in zip(texts, records, strict=True)
        ]
    )


def _trl_config(settings: stats.BenchSettings, path: str, max_steps: int) -> Any:
    """TRL's settings for the same work as ours (see the fairness notes at the top)."""
    from trl import GRPOConfig

    vision_ids, eos_ids = suppressed_ids(path)
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=settings.completions_per_step,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=settings.group_size,
        max_completion_length=settings.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"suppress_tokens": sorted(set(vision_ids) | set(eos_ids))},
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        beta=settings.kl_coef,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        disable_dropout=True,
        dataloader_num_workers=0,
        seed=settings.seed,
        disable_tqdm=True,
    )


def _trl_peft(settings: stats.BenchSettings) -> Any:
    """TRL's LoRA settings, equal to ours (`LoraSettings` defaults); None without --lora."""
    if not settings.lora:
        return None
    import _bench_api as api
    from peft import LoraConfig

    lora = api.LoraSettings()
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )


class GenerateClock:
    """Wraps a model's `generate` (TRL samples its rollouts through it): wall and CPU seconds
    and completion tokens of every call."""

    def __init__(self, generate: Any) -> None:
        self.generate = generate
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.tokens: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = self.generate(*args, **kwargs)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)
        self.tokens.append(int(out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1])))
        return out


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's GRPOTrainer; per-step end times, generate times and token counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    settings, path, encoder = _start_job(job)
    dataset = _trl_dataset(path, encoder, _training_prompts(settings, extra_steps=1))
    ends: list[float] = []
    cpu_ends: list[float] = []
    timed = settings.total_steps  # then one more step, profiled
    profile, profiled, peak_rss = StepProfile(), {}, []

    class StepEnds(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == timed:
                peak_rss.append(stats.peak_rss_mb())
                profile.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > timed:  # the profiled step has just ended
                profiled.update(profile.stop())
                return
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
        reward_funcs=[trl_safety_reward],
        args=_trl_config(settings, path, max_steps=timed + 1),
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=_trl_peft(settings),
        callbacks=[StepEnds()],
    )
    sampler = trainer.model  # unwrapped on one CPU process; its `generate` samples rollouts
    clock = sampler.generate = GenerateClock(sampler.generate)
    rss_before = stats.rss_mb()
    trainer.train()
    warm = settings.warmup_steps
    return {
        "kind": "trl",
        "step_seconds": stats.step_intervals(ends, warm),
        "step_cpu_seconds": stats.step_intervals(cpu_ends, warm),
        "generation_seconds": clock.seconds[warm:timed],
        "generation_cpu_seconds": clock.cpu_seconds[warm:timed],
        "completion_tokens": clock.tokens[warm:timed],
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss[0],
        "kernel_seconds": profiled,
    }


# -- ours -----------------------------------------------------------------------------------
# `_bench_ours` imports Lightning and the library: only the jobs that train ours load it.


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Train with our SafeGRPOModule through `Trainer.fit`."""
    import _bench_ours as ours

    settings, path, encoder = _start_job(job)
    records = _training_prompts(settings, extra_steps=1)
    module = ours.our_module(path, settings, **job.get("module_overrides", {}))
    result = ours.fit_ours(module, records, encoder, settings, profile=StepProfile())
    return {"kind": "ours", **result}


def run_scaling(job: dict[str, Any]) -> dict[str, Any]:
    """Ours at each (group_size, max_new_tokens) of `job["grid"]`, in this one process."""
    import _bench_ours as ours

    base, path, encoder = _start_job(job)
    rows = []
    for group_size, max_new_tokens in job["grid"]:
        settings = base.with_(group_size=group_size, max_new_tokens=max_new_tokens)
        records = _training_prompts(settings)
        module = ours.our_module(path, settings)
        result = ours.fit_ours(module, records, encoder, settings)
        rows.append(
            {
                "group_size": group_size,
                "max_new_tokens": max_new_tokens,
                "step_time_s": stats.median(result["step_seconds"]),
                "step_cpu_s": stats.median(result["step_cpu_seconds"]),
                "breakdown": stats.step_breakdown(result["step_seconds"], result["phase_seconds"]),
                "rollout_tokens_per_s": stats.median(
                    stats.ratio(t, g)
                    for t, g in zip(
                        result["completion_tokens"], result["generation_seconds"], strict=True
                    )
                ),
            }
        )
    return {"kind": "scaling", "rows": rows, "peak_rss_mb": stats.peak_rss_mb()}


def run_rollout(job: dict[str, Any]) -> dict[str, Any]:
    """Shared-prefix vs naive sampling and log-probs on a tiny Qwen2.5-VL, alternated."""
    import _bench_ours as ours

    settings, path, encoder = _start_job(job)  # the full step-guided prompt (default guide)
    records = demo_prompts(
        settings.prompts_per_step, image_size=job["image_size"], seed=settings.seed
    )
    batch = encoder.encode(records)
    timings, rollout = ours.rollout_timings(path, batch, settings, job["repeats"])
    return {
        "kind": "rollout",
        "timings": timings,
        "prompt_tokens": int(batch.attention_mask.sum(1).max()),
        "image_tokens": int(batch.model_kwargs["mm_token_type_ids"].sum(1).max())
        if "mm_token_type_ids" in batch.model_kwargs
        else 0,
        "completion_tokens": int(rollout.completion_mask.sum()),
        "peak_rss_mb": stats.peak_rss_mb(),
    }


def run_refmem(job: dict[str, Any]) -> dict[str, Any]:
    """A short fit of ours on a tiny Qwen2.5-VL (LoRA or not); the peak RSS is the result."""
    import _bench_ours as ours

    settings, path, encoder = _start_job(job)
    records = _training_prompts(settings)
    module = ours.our_module(path, settings)
    result = ours.fit_ours(module, records, encoder, settings)
    return {
        "kind": "refmem",
        "step_seconds": result["step_seconds"],
        "rss_before_train_mb": result["rss_before_train_mb"],
        "peak_rss_mb": stats.peak_rss_mb(),
    }


def run_mfu(job: dict[str, Any]) -> dict[str, Any]:
    """The train pass's achieved FLOP/s against the matmul peak and a plain transformers pass."""
    import _bench_mfu as mfu

    settings = stats.BenchSettings.from_dict(job["settings"])
    _setup_torch(settings.threads, settings.seed)
    return mfu.train_pass_efficiency(
        job["model_path"],
        rows=settings.mfu_rows,
        prompt=settings.mfu_prompt,
        completion=settings.mfu_completion,
        repeats=job["repeats"],
        seed=settings.seed,
    )


JOBS = {
    "ours": run_ours,
    "trl": run_trl,
    "scaling": run_scaling,
    "rollout": run_rollout,
    "refmem": run_refmem,
    "mfu": run_mfu,
}


def main(argv: list[str]) -> int:
    job_file, result_file = argv
    job = json.loads(Path(job_file).read_text())
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = JOBS[job["kind"]](job)
    Path(result_file).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
