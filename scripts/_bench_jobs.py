"""The benchmark's measurements, each run in a fresh process by `scripts/bench.py`.

`python scripts/_bench_jobs.py JOB.json RESULT.json` runs one job and writes its result. A
fresh process per job makes the peak resident memory (`ru_maxrss`) belong to that job alone.

Jobs:
- `ours`: our `SafeGRPOModule` through a Lightning `Trainer.fit`, timed per step (wall clock
  and process CPU time), with the module's own phase timings (`StepTimer`).
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

import itertools
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import _bench_stats as stats

log = logging.getLogger("bench")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Resident memory of this process now, in MiB (Linux `/proc`; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup_torch(threads: int, seed: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def _start_job(job: dict[str, Any]) -> tuple[stats.BenchSettings, str, Any]:
    """What every job does first: its settings, torch threads and seed, its model's encoder."""
    from safegrpo_pl.inputs import PromptEncoder

    settings = stats.BenchSettings(**job["settings"])
    _setup_torch(settings.threads, settings.seed)
    path = job["model_path"]
    return settings, path, PromptEncoder.from_pretrained(path)


def _training_prompts(settings: stats.BenchSettings) -> list[Any]:
    """The records of a timed run: one rollout batch per step, warm-up steps included."""
    return demo_prompts(settings.prompts_per_step * settings.total_steps, seed=settings.seed)


def demo_prompts(count: int, *, image_size: int = 64, seed: int = 0) -> list[Any]:
    """The first `count` records of the demo set's train split (deterministic)."""
    from safegrpo_pl.demo_data import DemoConfig, make_demo_split

    return make_demo_split("train", count, DemoConfig(image_size=image_size, seed=seed))


def trl_safety_reward(
    completions: list[Any],
    image_tag: list[str],
    text_tag: list[str],
    combine_tag: list[str],
    **_: Any,
) -> list[float]:
    """Our rule reward (`safegrpo_pl.rewards.safety_reward`) in TRL's reward-function form.

    TRL passes the decoded completions and every extra dataset column as lists, one entry
    per completion; conversational completions arrive as message lists.
    """
    from safegrpo_pl.rewards import safety_reward

    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [
        safety_reward(text, image_tag=i, text_tag=t, combine_tag=c)
        for text, i, t, c in zip(texts, image_tag, text_tag, combine_tag, strict=True)
    ]


def suppressed_ids(model_path: str) -> tuple[list[int], list[int]]:
    """(vision special-token ids, EOS ids) of the model at `model_path`: both are suppressed."""
    from transformers import AutoTokenizer, GenerationConfig

    from safegrpo_pl.model import eos_token_ids, vision_token_ids

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generation_config = GenerationConfig.from_pretrained(model_path)
    return vision_token_ids(tokenizer), eos_token_ids(tokenizer, generation_config)


# -- TRL ------------------------------------------------------------------------------------


def run_trl(job: dict[str, Any]) -> dict[str, Any]:
    """Train with TRL's GRPOTrainer; per-step end times, generate times and token counts."""
    import tempfile

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    settings, path, encoder = _start_job(job)
    records = _training_prompts(settings)
    texts = [encoder.prompt_text(r) for r in records]
    tokenizer = AutoTokenizer.from_pretrained(path)
    # TRL tokenises a plain-string prompt with special tokens on: check that adds nothing.
    ours_ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    if tokenizer(texts[0])["input_ids"] != ours_ids:
        raise RuntimeError("TRL would tokenise the prompt differently (special tokens added)")
    dataset = Dataset.from_list(
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
    vision_ids, eos_ids = suppressed_ids(path)
    config = GRPOConfig(
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
        max_steps=settings.total_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        disable_dropout=True,
        dataloader_num_workers=0,
        seed=settings.seed,
        disable_tqdm=True,
    )
    peft_config = None
    if settings.lora:
        from peft import LoraConfig

        from safegrpo_pl.model import LoraSettings

        lora = LoraSettings()
        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    ends: list[float] = []
    cpu_ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_safety_reward],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[StepEnds()],
    )
    generate_seconds: list[float] = []
    generate_cpu_seconds: list[float] = []
    generated_tokens: list[int] = []
    sampler = trainer.model  # unwrapped on one CPU process; its `generate` samples rollouts
    original_generate = sampler.generate

    def counting_generate(*args: Any, **kwargs: Any) -> Any:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = original_generate(*args, **kwargs)
        generate_seconds.append(time.perf_counter() - start)
        generate_cpu_seconds.append(time.process_time() - cpu_start)
        generated_tokens.append(int(out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1])))
        return out

    sampler.generate = counting_generate
    rss_before = rss_mb()
    trainer.train()
    warm = settings.warmup_steps
    return {
        "kind": "trl",
        "step_seconds": stats.step_intervals(ends, warm),
        "step_cpu_seconds": stats.step_intervals(cpu_ends, warm),
        "generation_seconds": generate_seconds[warm:],
        "generation_cpu_seconds": generate_cpu_seconds[warm:],
        "completion_tokens": generated_tokens[warm:],
        "rss_before_train_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


# -- ours -----------------------------------------------------------------------------------


def _our_module(model_path: str, settings: stats.BenchSettings, **overrides: Any) -> Any:
    """A configured `SafeGRPOModule` whose sampling never emits EOS (full-length completions)."""
    from safegrpo_pl.model import LoraSettings
    from safegrpo_pl.module import SafeGRPOModule
    from safegrpo_pl.sampling import SamplingSettings

    kwargs: dict[str, Any] = dict(
        model_name_or_path=model_path,
        group_size=settings.group_size,
        kl_coef=settings.kl_coef,
        lr=settings.lr,
        lora=LoraSettings() if settings.lora else None,
        sampling=SamplingSettings(
            max_new_tokens=settings.max_new_tokens, temperature=1.0, top_p=1.0
        ),
    )
    kwargs.update(overrides)
    module = SafeGRPOModule(**kwargs)
    module.configure_model()
    module.suppress_ids = sorted(set(module.suppress_ids) | set(module.eos_ids))
    return module


def _fit_ours(
    module: Any, records: list[Any], encoder: Any, settings: stats.BenchSettings
) -> dict[str, Any]:
    """`Trainer.fit` for `settings.total_steps` steps; per-step end times and phase timings."""
    from lightning import Callback, Trainer
    from torch.utils.data import DataLoader

    ends: list[float] = []
    cpu_ends: list[float] = []
    sample_cpu: list[float] = []
    phases: list[dict[str, float]] = []
    old_passes: list[int] = []
    original_pop = module.timer.pop
    original_frozen = module.frozen_logprobs
    original_sample = module.sample

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        start = time.process_time()
        try:
            return original_sample(*args, **kwargs)
        finally:
            sample_cpu.append(time.process_time() - start)

    def recording_pop() -> dict[str, float]:
        seconds = original_pop()
        phases.append(dict(seconds))
        return seconds

    def counting_frozen(*args: Any, reference: bool, **kwargs: Any) -> Any:
        if not reference:
            old_passes[-1] += 1
        return original_frozen(*args, reference=reference, **kwargs)

    class StepEnds(Callback):
        def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
            old_passes.append(0)

        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    module.timer.pop = recording_pop
    module.frozen_logprobs = counting_frozen
    module.sample = timed_sample
    rss_before = rss_mb()
    loader = DataLoader(
        records,
        batch_size=settings.prompts_per_step,
        shuffle=False,
        collate_fn=encoder,
        drop_last=True,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=settings.total_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[StepEnds()],
    )
    trainer.fit(module, train_dataloaders=loader)
    warm = settings.warmup_steps
    tokens = settings.completions_per_step * settings.max_new_tokens
    step_seconds = stats.step_intervals(ends, warm)
    timed_phases = phases[warm : len(ends)]
    return {
        "step_seconds": step_seconds,
        "step_cpu_seconds": stats.step_intervals(cpu_ends, warm),
        "phase_seconds": timed_phases,
        "generation_seconds": [p.get("generation", float("nan")) for p in timed_phases],
        "generation_cpu_seconds": sample_cpu[warm : len(ends)],
        "completion_tokens": [tokens] * len(step_seconds),
        "old_logprob_passes": old_passes[warm:],
        "rss_before_train_mb": rss_before,
    }


def run_ours(job: dict[str, Any]) -> dict[str, Any]:
    """Train with our SafeGRPOModule through `Trainer.fit`."""
    settings, path, encoder = _start_job(job)
    records = _training_prompts(settings)
    module = _our_module(path, settings, **job.get("module_overrides", {}))
    result = _fit_ours(module, records, encoder, settings)
    return {"kind": "ours", **result, "peak_rss_mb": peak_rss_mb()}


def run_scaling(job: dict[str, Any]) -> dict[str, Any]:
    """Ours at each (group_size, max_new_tokens) of `job["grid"]`, in this one process."""
    base, path, encoder = _start_job(job)
    rows = []
    for group_size, max_new_tokens in job["grid"]:
        settings = base.with_(group_size=group_size, max_new_tokens=max_new_tokens)
        records = _training_prompts(settings)
        module = _our_module(path, settings)
        result = _fit_ours(module, records, encoder, settings)
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
    return {"kind": "scaling", "rows": rows, "peak_rss_mb": peak_rss_mb()}


def run_rollout(job: dict[str, Any]) -> dict[str, Any]:
    """Shared-prefix vs naive sampling and log-probs on a tiny Qwen2.5-VL, alternated."""
    import torch

    settings, path, encoder = _start_job(job)  # the full step-guided prompt (default guide)
    records = demo_prompts(
        settings.prompts_per_step, image_size=job["image_size"], seed=settings.seed
    )
    batch = encoder.encode(records)
    module = _our_module(path, settings, kl_coef=0.0)
    from safegrpo_pl.sampling import SamplingSettings

    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=1.0, top_p=1.0)
    timings: dict[str, list[float]] = {
        f"{what}_{path}{clock}": []
        for what in ("sample", "logprobs")
        for path in ("shared", "naive")
        for clock in ("", "_cpu")
    }
    rollout = None
    for repeat in range(job["repeats"] + 1):  # the first round warms up, untimed
        for shared in (True, False):
            name = "shared" if shared else "naive"
            module.shared_prefix = shared
            torch.manual_seed(settings.seed + repeat)
            clocks = [(time.perf_counter(), time.process_time())]
            rollout = module.sample(batch, settings.group_size, sampling)
            clocks.append((time.perf_counter(), time.process_time()))
            module.frozen_logprobs(batch, rollout, reference=False)
            clocks.append((time.perf_counter(), time.process_time()))
            if not repeat:
                continue
            pairs = itertools.pairwise(clocks)
            for what, (before, after) in zip(("sample", "logprobs"), pairs, strict=True):
                timings[f"{what}_{name}"].append(after[0] - before[0])
                timings[f"{what}_{name}_cpu"].append(after[1] - before[1])
    assert rollout is not None
    return {
        "kind": "rollout",
        "timings": timings,
        "prompt_tokens": int(batch.attention_mask.sum(1).max()),
        "image_tokens": int(batch.model_kwargs["mm_token_type_ids"].sum(1).max())
        if "mm_token_type_ids" in batch.model_kwargs
        else 0,
        "completion_tokens": int(rollout.completion_mask.sum()),
        "peak_rss_mb": peak_rss_mb(),
    }


def run_refmem(job: dict[str, Any]) -> dict[str, Any]:
    """A short fit of ours on a tiny Qwen2.5-VL (LoRA or not); the peak RSS is the result."""
    settings, path, encoder = _start_job(job)
    records = _training_prompts(settings)
    module = _our_module(path, settings)
    result = _fit_ours(module, records, encoder, settings)
    return {
        "kind": "refmem",
        "step_seconds": result["step_seconds"],
        "rss_before_train_mb": result["rss_before_train_mb"],
        "peak_rss_mb": peak_rss_mb(),
    }


JOBS = {
    "ours": run_ours,
    "trl": run_trl,
    "scaling": run_scaling,
    "rollout": run_rollout,
    "refmem": run_refmem,
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
