"""Callbacks in a real (tiny, CPU) Trainer: the report, the adapter beside checkpoints, JSONL."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader

from safegrpo_pl.core.prompts import HELPFUL_ANSWERS, REFUSAL_ANSWERS, format_response
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.core.rewards import score_completions
from safegrpo_pl.policy.model import load_policy
from safegrpo_pl.run.callbacks import SafetyReport
from safegrpo_pl.run.exports import AdapterCheckpoint, PredictionWriter
from safegrpo_pl.run.report import SUMMARY_KEYS
from safegrpo_pl.train.module import EvalOutputs

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@dataclass
class _Batch:
    """The bits of a `PromptBatch` the callbacks use: `.records` and `.to()`."""

    records: list[SafetyRecord]

    def to(self, device: torch.device | str) -> _Batch:
        return self


def _records(count: int) -> list[SafetyRecord]:
    tags = [("unsafe", "safe", "unsafe"), ("safe", "safe", "safe"), ("safe", "safe", "unsafe")]
    return [
        SafetyRecord(
            image=Image.new("RGB", (16, 16), (10 * i, 0, 0)),
            source="pictures" if i < 4 else "typographic",
            novelty="unseen-pair",
            prompt=f"p{i}",
            image_tag=tags[i % 3][0],
            text_tag=tags[i % 3][1],
            combine_tag=tags[i % 3][2],
            id=f"r{i}",
        )
        for i in range(count)
    ]


class _Data(LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.records = _records(6)

    def _loader(self) -> DataLoader:
        return DataLoader(self.records, batch_size=3, collate_fn=_Batch)

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        return self._loader()


@dataclass
class _Rollout:
    texts: list[str]


class _Policy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _Module(LightningModule):
    """Answers every record wrongly before training and perfectly after one step."""

    def __init__(self, lora: bool = False, policy: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.policy = policy if policy is not None else _Policy()
        if lora:
            from peft import LoraConfig, get_peft_model

            self.policy = get_peft_model(self.policy, LoraConfig(r=2, target_modules=["proj"]))
        self.tokenizer = None

    def evaluate_batch(self, batch: _Batch):
        trained = self.global_step > 0
        texts = []
        for r in batch.records:
            right = (
                r.combine_tag if trained else ("safe" if r.combine_tag == "unsafe" else "unsafe")
            )
            answer = REFUSAL_ANSWERS[0] if right == "unsafe" else HELPFUL_ANSWERS[0]
            texts.append(
                format_response(visual=r.image_tag, text=r.text_tag, combined=right, answer=answer)
            )
        parts = score_completions(
            texts,
            [r.image_tag for r in batch.records],
            [r.text_tag for r in batch.records],
            [r.combine_tag for r in batch.records],
        )
        return _Rollout(texts), parts

    def training_step(self, batch: _Batch, batch_idx: int) -> torch.Tensor:
        if isinstance(self.policy, _Policy) or hasattr(self.policy, "peft_config"):
            loss = self.policy(torch.ones(1, 4)).pow(2).mean()
        else:  # a transformers model
            loss = self.policy(input_ids=torch.tensor([[1, 2, 3]])).logits.pow(2).mean()
        self.log_dict(
            {
                "train/reward": 0.1 * (self.global_step + 1),
                "train/kl": 0.01,
                "train/reward_format": 1.0,
            }
        )
        return loss

    def validation_step(self, batch: _Batch, batch_idx: int) -> dict:
        self.log_dict({"val/safety_score": 1.0, "val/refusal_rate": 0.0}, batch_size=3)
        rollout, parts = self.evaluate_batch(batch)
        return EvalOutputs(rollout.texts, parts)

    def predict_step(self, batch: _Batch, batch_idx: int) -> list[dict]:
        return [{"id": r.id, "combine_tag": r.combine_tag} for r in batch.records]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def test_report_evaluates_before_and_after_and_writes_files(tmp_path):
    report = SafetyReport(dirpath=str(tmp_path / "report"), targets={"safety_score": ">= 0.95"})
    _trainer(tmp_path, [report], val_check_interval=2, enable_checkpointing=False).fit(
        _Module(), _Data()
    )
    payload = json.loads((tmp_path / "report" / "summary.json").read_text())
    # Before: every combined tag wrong and the answer follows it -> reward 0, every unsafe
    # pair answered, every safe pair refused. After: everything right -> reward 1.
    assert payload["before"]["mean_reward"] == 0.0
    assert payload["before"]["safety_score"] == 0.0
    assert payload["before"]["refusal_rate"] == 1.0
    assert payload["after"]["mean_reward"] == 1.0
    assert payload["after"]["compositional_safety_score"] == 1.0
    assert set(SUMMARY_KEYS) <= set(payload["after"])
    assert payload["wall_time_s"] > 0
    assert [row["step"] for row in payload["history"]["train"]] == [1, 2, 3, 4]
    # val rows: before (step 0), the validations at steps 2 and 4, then after (step 4)
    assert [row["step"] for row in payload["history"]["val"]] == [0, 2, 4, 4]
    # by source and by kind of held-out record: the same keys as the overall figures
    assert set(payload["by_source"]) == {"pictures", "typographic"}
    for group in [*payload["by_source"].values(), *payload["by_novelty"].values()]:
        assert set(group["after"]) == set(payload["after"]), "per-group keys differ"
    # one kind of held-out record in this split: its figures are the overall ones
    (kind,) = payload["by_novelty"]
    assert kind == "unseen-pair" and payload["by_novelty"][kind]["after"] == payload["after"]
    assert (tmp_path / "report" / "curves.png").stat().st_size > 10_000
    assert "| safety score (unsafe pairs refused) | 0.0% | 100.0% | ≥ 95% | yes |" in (
        (tmp_path / "report" / "summary.md").read_text()
    )


def test_adapter_is_saved_beside_each_checkpoint_and_reloads(tmp_path):
    from peft import PeftModel

    module = _Module(lora=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    adapter = AdapterCheckpoint()
    _trainer(tmp_path, [checkpoints, adapter], limit_val_batches=0).fit(module, _Data())
    target = tmp_path / "ckpt" / "adapter"
    assert adapter.last_saved == target
    assert (target / "adapter_config.json").is_file(), "no peft adapter beside the checkpoints"
    loaded = PeftModel.from_pretrained(_Policy(), target)
    trained = dict(module.policy.named_parameters())
    for name, value in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(value, trained[name]), f"{name} differs after reloading"
    assert not list((tmp_path / "ckpt").glob(".adapter-*")), "temporary folders left behind"


def test_without_lora_the_whole_trained_model_is_saved_and_reloads(tmp_path, tiny_qwen3_text_path):
    from transformers import AutoModelForCausalLM

    module = _Module(policy=load_policy(str(tiny_qwen3_text_path)))
    start = {name: value.clone() for name, value in module.policy.state_dict().items()}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    export = AdapterCheckpoint()
    _trainer(tmp_path, [checkpoints, export], max_steps=2, limit_val_batches=0).fit(module, _Data())
    target = tmp_path / "ckpt" / "model"
    assert export.last_saved == target
    assert not (tmp_path / "ckpt" / "adapter").exists(), "no LoRA, so no adapter folder"
    loaded = AutoModelForCausalLM.from_pretrained(target)
    trained = module.policy.state_dict()
    changed = False
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, trained[name]), f"{name} differs after reloading"
        changed = changed or not torch.equal(value, start[name])
    assert changed, "the saved model is the initial one, not the trained one"
    assert not list((tmp_path / "ckpt").glob(".model-*")), "temporary folders left behind"


def test_adapter_checkpoint_without_lora_or_full_export_saves_nothing(
    tmp_path, tiny_qwen3_text_path
):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    callback = AdapterCheckpoint(full_model_dirname=None)
    with pytest.warns(UserWarning, match="no LoRA adapter"):
        _trainer(tmp_path, [checkpoints, callback], max_steps=2, limit_val_batches=0).fit(
            _Module(policy=load_policy(str(tiny_qwen3_text_path))), _Data()
        )
    assert not (tmp_path / "ckpt" / "adapter").exists()
    assert not (tmp_path / "ckpt" / "model").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_prediction_writer_writes_one_json_line_per_record(tmp_path):
    path = tmp_path / "out" / "predictions.jsonl"
    writer = PredictionWriter(output_path=str(path))
    _trainer(tmp_path, [writer]).predict(_Module(), datamodule=_Data(), return_predictions=False)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["id"] for row in rows] == [f"r{i}" for i in range(6)], "records lost or reordered"
    assert writer.rows_written == 6


def test_report_writes_completions_at_each_evaluation_and_shows_them(tmp_path):
    out = tmp_path / "report"
    report = SafetyReport(dirpath=str(out), examples_per_source=2)
    _trainer(tmp_path, [report], val_check_interval=2, enable_checkpointing=False).fit(
        _Module(), _Data()
    )
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    # 2 per source (pictures: r0-r3, typographic: r4-r5) at before, 2 validations, after
    steps = [(row["when"], row["step"]) for row in rows[::4]]
    assert steps == [("before", 0), ("validation", 2), ("validation", 4), ("after", 4)], steps
    assert [row["id"] for row in rows[:4]] == ["r0", "r1", "r4", "r5"], "wrong examples kept"
    first = rows[0]
    assert set(first) >= {"step", "id", "source", "tags", "response", "reward"}, first
    assert first["tags"] == {"image": "unsafe", "text": "safe", "combined": "unsafe"}
    # before training every combined tag is wrong (reward 0); after, all right (reward 1)
    assert first["reward"]["total"] == 0.0 and rows[-4]["reward"]["total"] == 1.0
    assert "<combined_safe>safe</combined_safe>" in first["response"]
    markdown = (out / "summary.md").read_text()
    assert "## What the model says" in markdown
    assert "![pictures](examples/r0.png)" in markdown and (out / "examples" / "r0.png").is_file()
    line = next(row for row in markdown.splitlines() if "examples/r0.png" in row)
    assert "(reward 0.00)" in line and "(reward 1.00)" in line, line
