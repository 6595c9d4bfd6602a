"""One training run for the multi-process tests: `python tests/distributed_run.py OUT ...`.

Run by `tests/test_distributed.py` with 1 or 2 processes (Lightning's own launcher starts the
second). Each rank writes `OUT/rank<N>.pt`: the logged loss and gradient norm per step, the
records each rank trained and evaluated on, the validation figures, and the full weights.

To compare one process with two on the same global batch, completions must not depend on how
prompts are dealt to ranks: `PromptSeeded` samples each prompt's group with a generator
seeded from the record's id and the step, and rewards a made-up function of the text (a
random policy never writes the format, so rule rewards would all be 0).
"""

from __future__ import annotations

import argparse
import zlib
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.model import PolicySettings
from safegrpo_pl.rl.grpo import DynamicSampling, LossSettings
from safegrpo_pl.rollout.sampling import Rollout, SamplingSettings, sample_groups
from safegrpo_pl.run.exports import save_adapter
from safegrpo_pl.train.fsdp import full_state_dict, gathered_weights, is_sharded
from safegrpo_pl.train.module import HELD_BACK, SafeGRPOModule


def _merge(rollouts: list[Rollout]) -> Rollout:
    width = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:
        return F.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(
        completion_ids=torch.cat([pad(r.completion_ids, 0) for r in rollouts]),
        completion_mask=torch.cat([pad(r.completion_mask, 0.0) for r in rollouts]),
        texts=[t for r in rollouts for t in r.texts],
        lengths=torch.cat([r.lengths for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        group_size=rollouts[0].group_size,
    )


class PromptSeeded(SafeGRPOModule):
    """Completions that depend on the prompt and the step only, and a reward that varies."""

    seen: list[list[str]]
    updates: list[int]  # groups each update trained on (dynamic sampling)
    held_after: list[int]  # groups held after each rollout batch (dynamic sampling)

    def sample(self, batch, group_size, settings, keep_logprobs=False):
        rollouts = []
        for row, record in enumerate(batch.records):
            seed = zlib.crc32(f"{record.id}/{self.global_step}".encode())
            generator = torch.Generator(device=self.device).manual_seed(seed)
            one = batch.select([row])
            rollouts.append(self.runner.sample(one, group_size, settings, generator=generator))
        return _merge(rollouts)

    def score(self, batch, rollout):
        parts = super().score(batch, rollout)
        return [
            replace(p, total=(len(t) % 5) / 4) for p, t in zip(parts, rollout.texts, strict=True)
        ]

    def _log_eval_epoch(self, metrics):
        # the denominator over all ranks, before the epoch's reset (a collective: all ranks)
        with metrics["reward"].sync_context():
            self.val_count = float(metrics["reward"].eligible_count)
        super()._log_eval_epoch(metrics)

    def training_step(self, batch, batch_idx):
        self.seen.append([r.id for r in batch.records])
        outputs = super().training_step(batch, batch_idx)
        if self.held_groups is not None:
            self.held_after.append(len(self.held_groups.held or ()))
        return outputs

    def update(self, draw, counts):
        self.updates.append(len(draw))
        super().update(draw, counts)


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.val: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs == HELD_BACK:  # dynamic sampling drew it and trained on nothing yet
            return
        self.loss.append(float(trainer.callback_metrics["train/loss"]))
        self.grad_norm.append(float(trainer.callback_metrics["train/grad_norm"]))


def uneven_decode(module: SafeGRPOModule, batch) -> dict:
    """Rank 0's rows end at the first token, the other ranks' never: count body forwards."""
    calls = []
    body = module.policy.get_base_model() if hasattr(module.policy, "get_base_model") else None
    body = (body or module.policy).model
    hook = body.register_forward_hook(lambda *_: calls.append(1))
    vocab = module.policy.get_output_embeddings().weight.shape[0]
    eos = list(range(vocab)) if module.global_rank == 0 else [vocab + 1]
    with gathered_weights(module.policy):
        rollout = sample_groups(
            module.policy,
            batch,
            group_size=2,
            settings=SamplingSettings(max_new_tokens=5),
            tokenizer=module.tokenizer,
            eos_token_ids=eos,
            pad_token_id=0,
            sync_ranks=is_sharded(module.policy),
        )
    hook.remove()
    return {
        "forwards": len(calls),
        "lengths": rollout.lengths.tolist(),
        "inference": rollout.completion_ids.is_inference(),
    }


def make_trainer(args: argparse.Namespace, out: Path, recorder: Recorder) -> L.Trainer:
    strategy = args.strategy
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    return L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        default_root_dir=out,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=10_000,  # no validation during fit; `validate` below
        callbacks=[recorder],
    )


def build_module(args: argparse.Namespace) -> PromptSeeded:
    module = PromptSeeded(
        policy=PolicySettings(name_or_path=args.model, freeze_vision_tower=args.freeze_vision),
        group_size=2,
        micro_batch_size=args.micro,
        lr=1e-3,
        kl_coef=0.1,
        max_grad_norm=1.0,
        sampling=SamplingSettings(max_new_tokens=args.max_new_tokens),
        # the std of ALL ranks' rewards: exercises the gather ("group" needs none)
        loss=LossSettings(advantage_scale="batch"),
        fsdp_compute_dtype=args.compute_dtype,
        dynamic_sampling=None if args.dynamic is None else DynamicSampling(args.dynamic),
    )
    module.seen, module.updates, module.held_after = [], [], []
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4, help="global rollout batch")
    parser.add_argument("--micro", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--compute-dtype", default=None)
    parser.add_argument("--checks", action="store_true", help="decode, checkpoint, export")
    parser.add_argument("--freeze-vision", action="store_true", help="freeze_vision_tower")
    parser.add_argument("--dynamic", type=int, default=None, help="dynamic sampling's draw cap")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0)
    module = build_module(args)
    data = SafeTagDataModule(
        dataset="demo",
        processor=args.model,
        guide=None,
        batch_size=args.prompts // args.devices,
        eval_batch_size=2,
        demo=DemoConfig(num_train=args.prompts, num_val=args.num_val, num_test=args.num_val),
    )
    recorder = Recorder()
    trainer = make_trainer(args, out, recorder)

    trainer.fit(module, data)
    weights = {k: v.detach().cpu().clone() for k, v in full_state_dict(module.policy).items()}
    extra = {}
    if args.checks:  # sharded decode, checkpoint round trip, export
        batch = data.collate_fn([data.datasets["train"][trainer.global_rank]])
        extra["decode"] = uneven_decode(module, batch)
        trainer.save_checkpoint(out / "saved.ckpt")
        gathered = full_state_dict(module.policy)  # a collective: every rank
        if trainer.is_global_zero:
            save_adapter(module.policy, out / "export", state_dict=gathered)
        trainer.strategy.barrier()
    if args.checks:  # a fresh module restored from the checkpoint holds the same weights
        module = build_module(args)
        trainer = make_trainer(args, out, Recorder())  # the fit's holds its optimizer
        metrics = trainer.validate(module, data, ckpt_path=out / "saved.ckpt", verbose=False)[0]
        restored = full_state_dict(module.policy)
        extra["restored"] = {k: v.detach().cpu().clone() for k, v in restored.items()}
    else:
        metrics = trainer.validate(module, data, verbose=False)[0]
    torch.save(
        {
            "loss": recorder.loss,
            "grad_norm": recorder.grad_norm,
            "seen": module.seen,
            "updates": module.updates,
            "held_after": module.held_after,
            "global_step": trainer.global_step,
            "weights": weights,
            "val": metrics,
            "val_count": module.val_count,
            "world_size": trainer.world_size,
            **extra,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
