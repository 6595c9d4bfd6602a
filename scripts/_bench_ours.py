"""Our side of the benchmark, run inside the child processes of `scripts/_bench_jobs.py`.

- `fit_ours`: a `SafeGRPOModule` through a Lightning `Trainer.fit`. Its step timings come from
  outside the module: a callback (`StepRecorder`) notes when each step ends and reads the phase
  seconds the module logs every step (`time/generation`, `time/reward`, ...). The module is
  not patched, so what is timed is exactly what `fit` runs.
- `rollout_timings`: shared-prefix sampling and log-probs against the naive path, called
  directly on a loaded policy.

Names from `safegrpo_pl` come through `_bench_api` (one place to fix when they move).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import _bench_api as api
import _bench_stats as stats
import torch
from lightning import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader


def our_module(model_path: str, settings: stats.BenchSettings, **overrides: Any) -> Any:
    """A configured `SafeGRPOModule` whose sampling never emits EOS (full-length completions)."""
    kwargs: dict[str, Any] = dict(
        policy=api.PolicySettings(
            name_or_path=model_path, lora=api.LoraSettings() if settings.lora else None
        ),
        group_size=settings.group_size,
        kl_coef=settings.kl_coef,
        lr=settings.lr,
        sampling=_sampling(settings),
        rollout_micro_batch_size=settings.rollout_chunk,
    )
    kwargs.update(overrides)
    module = api.SafeGRPOModule(**kwargs)
    module.configure_model()  # Lightning's hook; loading here puts the weights in the RSS
    api.sample_full_length(module)
    return module


def _sampling(settings: stats.BenchSettings) -> Any:
    return api.SamplingSettings(
        max_new_tokens=settings.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        decode=settings.decode,
    )


class StepRecorder(Callback):
    """Per training batch (one rollout and one optimiser step here): when it ended, in wall and
    process CPU seconds, and the phase seconds the module logged for it.

    `trainer.callback_metrics` holds the values the step just logged when this hook runs. A key
    logged in an earlier step stays there, which is harmless: one fit logs the same phases every
    step (they follow from the module's settings).
    """

    def __init__(self, profile: Any = None, profile_step: int | None = None) -> None:
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.profile, self.profile_step = profile, profile_step
        self.profiled: dict[str, float] = {}
        self.peak_rss_before_profile = float("nan")

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.profile_step:
            self.peak_rss_before_profile = stats.peak_rss_mb()
            self.profile.start()

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx == self.profile_step:
            self.profiled = self.profile.stop()
            return
        self.ends.append(time.perf_counter())  # first: reading the metrics takes time too
        self.cpu_ends.append(time.process_time())
        self.phases.append(stats.logged_phases(trainer.callback_metrics))


def fit_ours(
    module: Any,
    records: list[Any],
    encoder: Any,
    settings: stats.BenchSettings,
    profile: Any = None,
) -> dict[str, Any]:
    """`Trainer.fit` for `settings.total_steps` steps; per-step times and phase timings.

    With `profile` (a `_bench_jobs.StepProfile`) one more step runs under it, after the timed
    ones (`records` must hold its batch): the result then has its `kernel_seconds` and the
    `peak_rss_mb` read before it. Old log-probs cost a forward pass of their own only when the
    module logs an `old_logprobs` phase, so the passes per step are counted from that key.
    """
    timed = settings.total_steps
    recorder = StepRecorder(profile, timed if profile is not None else None)
    rss_before = stats.rss_mb()
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
        max_steps=timed + (profile is not None),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, train_dataloaders=loader)
    warm = settings.warmup_steps
    step_seconds = stats.step_intervals(recorder.ends, warm)
    step_cpu_seconds = stats.step_intervals(recorder.cpu_ends, warm)
    timed_phases = recorder.phases[warm:]
    generation = [p.get("generation", float("nan")) for p in timed_phases]
    tokens = settings.completions_per_step * settings.max_new_tokens
    return {
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "phase_seconds": timed_phases,
        "generation_seconds": generation,
        "generation_cpu_seconds": stats.cpu_seconds_estimate(
            generation, step_seconds, step_cpu_seconds
        ),
        "completion_tokens": [tokens] * len(step_seconds),
        "old_logprob_passes": [int("old_logprobs" in p) for p in timed_phases],
        "rss_before_train_mb": rss_before,
        **(
            {"kernel_seconds": recorder.profiled, "peak_rss_mb": recorder.peak_rss_before_profile}
            if profile is not None
            else {}
        ),
    }


def _rollout_policy(model_path: str, settings: stats.BenchSettings) -> tuple[Any, dict[str, Any]]:
    """The rollout job's policy (eval mode) and the token arguments of `sample_groups`, set as
    the module sets them, with EOS suppressed as well (full-length completions)."""
    from transformers import AutoTokenizer

    lora = api.LoraSettings() if settings.lora else None
    policy = api.load_policy(model_path, dtype="float32", lora=lora).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = api.DecodeIds.of(tokenizer, policy).never_ending()
    return policy, {"tokenizer": tokenizer, **ids.sampling_kwargs()}


def rollout_timings(
    model_path: str, batch: Any, settings: stats.BenchSettings, repeats: int
) -> tuple[dict[str, list[float]], Any]:
    """Seconds (wall and CPU) of sampling and of one log-prob pass, shared prefix and naive,
    alternated; the first round warms up untimed. Returns the timings and the last rollout."""
    policy, token_args = _rollout_policy(model_path, settings)
    sampling, group = _sampling(settings), settings.group_size
    timings: dict[str, list[float]] = {
        f"{what}_{path}{clock}": []
        for what in ("sample", "logprobs")
        for path in ("shared", "naive")
        for clock in ("", "_cpu")
    }
    rollout = None
    for repeat in range(repeats + 1):
        for shared in (True, False):
            name = "shared" if shared else "naive"
            torch.manual_seed(settings.seed + repeat)
            clocks = [(time.perf_counter(), time.process_time())]
            rollout = api.sample_groups(
                policy,
                batch,
                group_size=group,
                settings=sampling,
                shared_prefix=shared,
                **token_args,
            )
            clocks.append((time.perf_counter(), time.process_time()))
            with torch.no_grad():
                api.completion_logprobs(
                    policy,
                    batch,
                    rollout.completion_ids,
                    rollout.completion_mask,
                    group_size=group,
                    temperature=sampling.temperature,
                    shared_prefix=shared,
                )
            clocks.append((time.perf_counter(), time.process_time()))
            if not repeat:
                continue
            pairs = itertools.pairwise(clocks)
            for what, (before, after) in zip(("sample", "logprobs"), pairs, strict=True):
                timings[f"{what}_{name}"].append(after[0] - before[0])
                timings[f"{what}_{name}_cpu"].append(after[1] - before[1])
    return timings, rollout
