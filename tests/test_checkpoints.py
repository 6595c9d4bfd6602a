"""Bad checkpoints stop a run with an error naming the file and the problem, and no load ever
skips a weight of the policy silently (LoRA checkpoints load with `strict_loading=False`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from test_module import _data, _module, _trainer

from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.policy.model import LoraSettings
from safegrpo_pl.run.trainer_cli import SafeGRPOCLI
from safegrpo_pl.train.checkpoints import SIGNATURE_KEY, CheckpointError, check_file, check_policy
from safegrpo_pl.train.module import SafeGRPOModule


def _checkpoint(path: Path, root: Path, **kwargs) -> Path:
    """One optimiser step of a tiny run, saved."""
    L.seed_everything(0)
    trainer = _trainer(root, 1)
    trainer.fit(_module(path, **kwargs), _data(path))
    trainer.save_checkpoint(root / "run.ckpt")
    return root / "run.ckpt"


def _resume(path: Path, root: Path, checkpoint: Path, **kwargs) -> None:
    _trainer(root, 2).fit(_module(path, **kwargs), _data(path), ckpt_path=str(checkpoint))


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_qwen25vl_path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora_ckpt")
    return _checkpoint(tiny_qwen25vl_path, root, lora=LoraSettings(r=2, alpha=4))


def test_a_truncated_checkpoint_is_named_as_truncated(lora_checkpoint, tmp_path):
    data = lora_checkpoint.read_bytes()
    bad = tmp_path / "cut.ckpt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{bad}.*truncated"):
        check_file(bad)
    # The command line checks it before Lightning's own `torch.load` could fail with a trace.
    with pytest.raises(CheckpointError, match=rf"{bad}.*truncated"):
        SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            args=["fit", "--trainer.accelerator", "cpu", "--ckpt_path", str(bad)],
        )


def test_a_corrupt_weight_fails_its_checksum(lora_checkpoint, tmp_path):
    import zipfile

    data = bytearray(lora_checkpoint.read_bytes())
    with zipfile.ZipFile(lora_checkpoint) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 8)
    header = record.header_offset  # the local header's name and extra lengths (bytes 26-30)
    name_len, extra_len = (
        int.from_bytes(data[header + i : header + i + 2], "little") for i in (26, 28)
    )
    start = header + 30 + name_len + extra_len
    data[start : start + 4] = bytes(255 - b for b in data[start : start + 4])  # flip 4 bytes
    bad = tmp_path / "flipped.ckpt"
    bad.write_bytes(bytes(data))
    assert torch.load(bad, weights_only=False), "torch itself does not notice"
    with pytest.raises(CheckpointError, match=rf"{bad} is corrupt.*checksum"):
        check_file(bad)


def test_a_checkpoint_of_another_architecture_is_refused(
    tiny_qwen25vl_path, tiny_qwen3vl_path, tmp_path
):
    checkpoint = _checkpoint(tiny_qwen25vl_path, tmp_path / "a")
    with pytest.raises(
        CheckpointError, match=rf"{checkpoint} holds a qwen2_5_vl.*loads a qwen3_vl"
    ):
        _resume(tiny_qwen3vl_path, tmp_path / "b", checkpoint)


def test_a_checkpoint_with_other_lora_settings_is_refused(
    tiny_qwen25vl_path, lora_checkpoint, tmp_path
):
    with pytest.raises(CheckpointError, match=rf"{lora_checkpoint}.*LoRA settings.*r=2.*r=4"):
        _resume(tiny_qwen25vl_path, tmp_path, lora_checkpoint, lora=LoraSettings(r=4, alpha=4))
    with pytest.raises(CheckpointError, match=r"this run has \[no LoRA"):
        _resume(tiny_qwen25vl_path, tmp_path, lora_checkpoint)


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_non_strict_lora_loading_never_skips_a_key(
    tiny_qwen25vl_path, lora_checkpoint, tmp_path, change
):
    state = torch.load(lora_checkpoint, weights_only=False)
    state.pop(SIGNATURE_KEY)  # as an older checkpoint: only the key check stands
    weights = state["state_dict"]
    if change == "missing":
        weights.pop(sorted(weights)[0])
    else:
        weights["policy.extra.lora_A.weight"] = torch.zeros(2, 2)
    edited = tmp_path / "edited.ckpt"
    torch.save(state, edited)
    module_kwargs = {"lora": LoraSettings(r=2, alpha=4)}
    assert _module(tiny_qwen25vl_path, **module_kwargs).strict_loading is False
    with pytest.raises(CheckpointError, match=rf"{edited}.*1 {change}"):
        _resume(tiny_qwen25vl_path, tmp_path, edited, **module_kwargs)


def test_the_command_line_refuses_a_checkpoint_of_another_configured_model(
    lora_checkpoint, tiny_qwen3vl_path
):
    """Lightning would swap the configured model for the checkpoint's without a word."""
    with pytest.raises(CheckpointError, match=rf"{lora_checkpoint}.*name_or_path"):
        SafeGRPOCLI(
            SafeGRPOModule,
            SafeTagDataModule,
            parser_kwargs={"parser_mode": "omegaconf"},
            args=[
                "fit",
                "--model.policy.name_or_path",
                str(tiny_qwen3vl_path),
                "--ckpt_path",
                str(lora_checkpoint),
            ],
        )


def _signature(**changes):
    base = {
        "model_type": "qwen2_5_vl",
        "shapes": {"a.weight": [4, 4], "b.weight": [4]},
        "lora": None,
        "start": "qwen2_5_vl-warmup-1234",
    }
    return {**base, **changes}


def test_a_checkpoint_of_another_size_names_the_first_differing_tensor():
    other = _signature(shapes={"a.weight": [8, 8], "b.weight": [4]})
    with pytest.raises(CheckpointError, match=r"x.ckpt holds another qwen2_5_vl.*a.weight is"):
        check_policy(_signature(), other, "x.ckpt")


def test_a_checkpoint_from_another_warm_up_is_refused():
    """With LoRA the base weights come from the warm-up's folder, not from the checkpoint; and
    without it the reference does: continuing from another warm-up is another run."""
    other = _signature(start="qwen2_5_vl-warmup-5678")
    with pytest.raises(CheckpointError, match=r"x.ckpt continued from.*1234.*5678"):
        check_policy(_signature(), other, "x.ckpt")
    check_policy(_signature(), _signature(), "x.ckpt")  # the same passes


def test_the_command_line_check_passes_the_checkpoints_own_settings(
    tiny_qwen25vl_path, lora_checkpoint
):
    from dataclasses import asdict

    from safegrpo_pl.policy.model import PolicySettings
    from safegrpo_pl.train.checkpoints import check_cli_checkpoint

    policy = PolicySettings(name_or_path=str(tiny_qwen25vl_path), lora=LoraSettings(r=2, alpha=4))
    check_cli_checkpoint(lora_checkpoint, {"policy": asdict(policy)})  # no error
    with pytest.raises(CheckpointError, match=r"model.policy.lora"):
        other = PolicySettings(name_or_path=str(tiny_qwen25vl_path), lora=LoraSettings(r=8))
        check_cli_checkpoint(lora_checkpoint, {"policy": asdict(other)})
