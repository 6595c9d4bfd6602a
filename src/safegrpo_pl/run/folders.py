"""Where a run writes: one folder per fit, which resumes and evaluations find again.

Lightning gives each run a logger folder `<default_root_dir>/logs/version_N/` holding the logs,
`checkpoints/` (with the exported model beside them) and the report. Two things it does not do
on its own, and which the CLI needs:

- `--ckpt_path last` must find the newest `last.ckpt` of *earlier* runs. Lightning only looks in
  the folder of the run being started, which is a new `version_N+1`, so it would find nothing
  and train from scratch. `find_last_checkpoint` searches the whole `default_root_dir` instead.
- A resumed fit, and `validate` / `test` / `predict` on a fit's checkpoint, must write into that
  fit's folder rather than a fresh `version_N` holding only a config. `logger_for` picks the
  folder from the checkpoint's path: the fit's own folder for a resumed fit (its `metrics.csv`
  is appended to), `<fit folder>/<stage>/` for an evaluation.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

LOGS_NAME = "logs"  # <default_root_dir>/logs/version_N: the default logger's folder


def find_last_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete `last*.ckpt` anywhere under `root` (by modification time), or
    None; a newer one cut short (no zip directory at its end) is named in a warning and passed
    over. Its records' checksums are read once, later, by `check_cli_checkpoint`."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted(
        (p for p in root.rglob("last*.ckpt") if p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for index, path in enumerate(found):
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError) as error:
            log.warning("--ckpt_path last: passing over %s: it cannot be read (%s)", path, error)
            continue
        if index:
            log.warning("--ckpt_path last: resuming from %s, the newest intact one", path)
        return path
    return None


def find_hpc_checkpoint(root: str | os.PathLike[str]) -> Path | None:
    """The `hpc_ckpt_<n>.ckpt` in `root` with the highest n (the one Lightning resumes from)."""
    numbered = [
        (int(m.group(1)), p)
        for p in Path(root).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return max(numbered)[1] if numbered else None


@dataclass(frozen=True)
class RunFolder:
    """A fit's logger folder, `<save_dir>/<name>/<version>`, as a CSV logger takes it."""

    save_dir: Path
    name: str
    version: str

    @property
    def path(self) -> Path:
        return self.save_dir / self.name / self.version


def run_folder_of(ckpt_path: str | os.PathLike[str]) -> RunFolder | None:
    """The fit folder that holds `ckpt_path` (`<save_dir>/<name>/<version>/checkpoints/x.ckpt`),
    or None for a checkpoint stored anywhere else."""
    path = Path(ckpt_path).resolve()
    if path.parent.name != "checkpoints" or len(path.parents) < 4:
        return None
    version_dir = path.parent.parent
    return RunFolder(version_dir.parent.parent, version_dir.parent.name, version_dir.name)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing `metrics.csv` is kept and appended to
    (Lightning's deletes it), so a resumed fit keeps the rows of the steps before the resume."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            header = next(csv.reader(file), [])
        self.metrics_keys = sorted(header)


class RunLogger(CSVLogger):
    """`CSVLogger` that can continue an existing run folder (`append=True`) instead of
    wiping its `metrics.csv`."""

    def __init__(self, *args, append: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.append = append

    @property
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None and self.append:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return super().experiment


def keep_logged_rows(loggers: list[Any]) -> None:
    """Make each plain `CSVLogger` of a resumed fit append to its `metrics.csv`: one set in a
    config names a folder the first run wrote, and Lightning's writer would wipe its rows."""
    for logger in loggers:
        if isinstance(logger, CSVLogger) and logger._experiment is None:
            logger._fs.makedirs(logger.log_dir, exist_ok=True)
            logger._experiment = _AppendingWriter(log_dir=logger.log_dir)


def logger_for(
    stage: str,
    default_root_dir: str | None,
    ckpt_path: str | None,
    run_folder: str | None = None,
) -> RunLogger:
    """The default logger of a run of `stage` ("fit", "validate", "test", "predict").

    A fresh fit gets `<default_root_dir>/logs/version_N` (the next free N). A run from a fit's
    checkpoint writes into that fit's folder: a resumed fit continues it, an evaluation gets its
    own subfolder named after the stage, so it never overwrites the fit's logs or config.
    `run_folder`: the fit folder a checkpoint stored elsewhere (an HPC checkpoint) names.
    """
    folder = run_folder_of(ckpt_path) if ckpt_path else None
    if folder is None and ckpt_path and run_folder and Path(run_folder).is_dir():
        version_dir = Path(run_folder).resolve()
        folder = RunFolder(version_dir.parent.parent, version_dir.parent.name, version_dir.name)
    if folder is None:
        return RunLogger(default_root_dir or os.getcwd(), name=LOGS_NAME)
    if stage == "fit":
        return RunLogger(folder.save_dir, name=folder.name, version=folder.version, append=True)
    return RunLogger(folder.save_dir, name=folder.name, version=f"{folder.version}/{stage}")
