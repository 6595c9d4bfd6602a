"""Lightning callbacks that export what a run produced, for use without Lightning.

- `AdapterCheckpoint` saves the trained policy next to the Lightning checkpoints whenever one is
  saved: the LoRA adapter in peft's own format (`save_pretrained`, loadable with
  `PeftModel.from_pretrained(base, path)`), or, without LoRA, the whole model in transformers'
  format; `save_adapter` is the export itself.
- `PredictionWriter` writes what `predict_step` returns (a list of dicts per batch) as JSONL.

They say where the files are through Lightning's rank-zero logging, so only one process speaks.
Under FSDP the export gathers the full state dict to rank 0 first (a collective, on every
rank), and rank 0 alone writes it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from safegrpo_pl.core.files import TRAINED_MARKER, atomic_folder, is_inside_cache
from safegrpo_pl.train.fsdp import full_state_dict, is_sharded


class AdapterCheckpoint(Callback):
    """Save the trained policy in a loadable format next to the Lightning checkpoints.

    A Lightning checkpoint resumes training; this is what a user deploys. Every time a
    checkpoint is saved, the policy goes to `<checkpoint dir>/<dirname>` (overwritten, written
    to a temporary folder first so a crash never leaves half of one), with the tokenizer
    beside it:
    - with LoRA, the adapter in peft's format, to `dirname`. Load it with
      `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), path)`,
      where `base` is the adapter config's `base_model_name_or_path`: a hub id or folder of
      yours as given, or, for a base that lies in the project's cache (the warmed-up demo
      model), a copy saved beside the adapter as `base/`;
    - without LoRA (all weights trained), there is no adapter: the whole model in
      transformers' format goes to `full_model_dirname`, loadable with `from_pretrained`; with
      `full_model_dirname=None` the callback warns once and saves nothing.

    Args:
        dirpath: folder of the export's parent; None: the `ModelCheckpoint`'s folder, else
            `<default_root_dir>/checkpoints`.
        dirname: the adapter folder's name.
        full_model_dirname: the folder's name for a policy without LoRA, or None to skip it.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        dirname: str = "adapter",
        full_model_dirname: str | None = "model",
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.dirname = dirname
        self.full_model_dirname = full_model_dirname
        self.last_saved: Path | None = None
        self._warned = False

    def _target(self, trainer: Trainer, name: str) -> Path:
        if self.dirpath:
            return Path(self.dirpath) / name
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                return Path(callback.dirpath) / name
        return Path(trainer.default_root_dir) / "checkpoints" / name

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        policy = getattr(pl_module, "policy", None)
        has_adapter = hasattr(policy, "peft_config")
        exportable = hasattr(policy, "save_pretrained") and self.full_model_dirname is not None
        if not has_adapter and not exportable:
            if not self._warned:
                rank_zero_warn(
                    "AdapterCheckpoint: the policy has no LoRA adapter (model.policy.lora "
                    "is null) and full_model_dirname is None; only the Lightning checkpoint "
                    "is saved"
                )
                self._warned = True
            return
        # Gathered on every rank (a collective under FSDP); None: the policy's own weights.
        state_dict = full_state_dict(policy) if is_sharded(policy) else None
        if not trainer.is_global_zero:
            return
        name = self.dirname if has_adapter else self.full_model_dirname
        target = self._target(trainer, name)
        encoder = getattr(trainer.datamodule, "encoder", None)  # image processor's home
        save_adapter(
            policy,
            target,
            tokenizer=getattr(pl_module, "tokenizer", None),
            image_processor=getattr(encoder, "image_processor", None),
            base_path=getattr(pl_module, "policy_path", None) if has_adapter else None,
            state_dict=state_dict,
        )
        self.last_saved = target


def save_adapter(
    policy: Any,
    target: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    image_processor: Any = None,
    base_path: str | None = None,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """`policy.save_pretrained` (a peft adapter, or a whole transformers model) to `target`
    atomically, replacing the previous export, with the tokenizer and image processor, so the
    folder loads on its own. `state_dict` replaces the policy's own tensors (the gathered
    full weights of a sharded policy).

    The folder is marked trained (`files.TRAINED_MARKER`), so that a run starting from it skips
    the format warm-up. An adapter's base that lies in the project's cache (the warm-up's
    output, a built tiny model) is copied beside it as `base/`, and the adapter points there:
    clearing the cache must not orphan the adapter.
    """
    target = Path(target)
    base = _owned_base(base_path, target.parent / "base")
    with atomic_folder(target, replace=True) as tmp:
        if state_dict is None:
            policy.save_pretrained(tmp)
        else:
            policy.save_pretrained(tmp, state_dict=state_dict)
        for companion in (tokenizer, image_processor):
            if companion is not None:
                companion.save_pretrained(tmp)
        if base is not None:
            _point_adapter_at(tmp, base)
        marker = {"trained_by": "safegrpo_pl", "base_model": base or base_path}
        (tmp / TRAINED_MARKER).write_text(json.dumps(marker, indent=2))
    return target


def _owned_base(base_path: str | None, copy_to: Path) -> str | None:
    """The base an adapter should name: a copy beside the export when `base_path` lies in the
    cache (copied once), else None (leave the adapter's own reference)."""
    if base_path is None or not Path(base_path).is_dir() or not is_inside_cache(base_path):
        return None
    if not (copy_to / "config.json").is_file():
        with atomic_folder(copy_to, replace=True) as tmp:
            shutil.copytree(base_path, tmp, dirs_exist_ok=True)
    return str(copy_to.resolve())


def _point_adapter_at(folder: Path, base: str) -> None:
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2))


class PredictionWriter(BasePredictionWriter):
    """Write each predict batch's list of dicts (`predict_step`'s output) as JSON lines.

    Args:
        output_path: the JSONL file; None: `predictions.jsonl` in the run's folder (the
            logger's `log_dir`, e.g. `runs/tiny/logs/version_0/predict/`), else in
            `default_root_dir`. The CLI adds this writer to every `predict`. Under
            several processes each writes its own file, suffixed `.rank<N>`.
    """

    def __init__(self, output_path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self.rows_written = 0

    def _path(self, trainer: Trainer) -> Path:
        folder = trainer.log_dir or trainer.default_root_dir  # the run's folder
        path = Path(self.output_path or Path(folder) / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.path = self._path(trainer)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")
        self.rows_written = 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._file is None:
            raise RuntimeError("PredictionWriter: no open file; on_predict_start did not run")
        rows = prediction if isinstance(prediction, list) else [prediction]
        for row in rows:
            if not isinstance(row, Mapping):
                raise TypeError(
                    f"PredictionWriter expects dicts from predict_step, got {type(row).__name__}"
                )
            self._file.write(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n")
            self.rows_written += 1
        self._file.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        rank_zero_info(f"PredictionWriter: wrote {self.rows_written} predictions to {self.path}")
