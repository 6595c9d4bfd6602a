"""Nothing lost, whatever stopped the run: the README's demo config (`configs/tiny.yaml`, fewer
records and steps, its frozen vision tower, default mini-batch and learning-rate warm-up kept)
stopped four ways in a row and resumed through the command line each time ends exactly as the
unbroken run: every logged figure and the final weights, bitwise on CPU.

The chain, on 3 rollout batches per epoch (one optimiser step each):
- a fit that reached `--trainer.max_steps 2` (mid-epoch), resumed with `--ckpt_path last`;
- one that reached `max_steps 3`, at the end of an epoch, resumed the same way;
- Ctrl-C (SIGINT) during step 4: the batch finishes, `last.ckpt` is written, exit 130;
- SIGTERM during step 5: an HPC checkpoint, resumed with `--ckpt_path hpc`, up to step 6.
The learning rate is the config's cosine decay after a warm-up (2 steps here, so that steps
3-6 decay). A longer `max_steps` stretches a decay, the one thing a resume changes (README,
and `test_module.py` for the stretched rate); each stopped part here fixes the schedule's
length with `--model.lr_decay_steps 6`, and the unbroken run has plain `max_steps 6`: equal
bit for bit, so the schedule is the only difference.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from processes import run_in_own_group

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
SMALL = (
    "--data.demo.num_train", "24", "--data.demo.num_val", "8", "--data.demo.num_test", "8",
    "--data.batch_size", "8", "--data.eval_batch_size", "8",
    "--model.warmup.steps", "20", "--model.sampling.max_new_tokens", "32",
    "--model.lr_warmup_steps", "2", "--trainer.val_check_interval", "1000",
    "--trainer.enable_progress_bar", "false",
)  # fmt: skip
SIGNAL_AT = "--trainer.callbacks+=signal_sender.SignalAtStep"


def fit(root: Path, cache: Path, *extra: str, path: tuple[str, ...] = ()) -> tuple[int, str]:
    """`python -m safegrpo_pl fit --config configs/tiny.yaml ...`, as the README writes it
    (`path`: more folders for the test's callbacks)."""
    env = {**os.environ, "SAFEGRPO_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    here = Path(__file__).parent
    folders = [str(REPO / "src"), str(here), *path, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(folders)
    command = [sys.executable, "-m", "safegrpo_pl", "fit", "--config", "configs/tiny.yaml"]
    command += [*SMALL, "--trainer.default_root_dir", str(root), *extra]
    process_cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return run_in_own_group(command, env, timeout=600)
    finally:
        os.chdir(process_cwd)


def rows(root: Path) -> dict[int, dict[str, str]]:
    """{step: the training figures logged at it} from the run's one metrics.csv."""
    runs = sorted((root / "logs").glob("version_*"))
    assert [r.name for r in runs] == ["version_0"], f"one run folder expected: {runs}"
    with open(runs[0] / "metrics.csv") as f:
        out: dict[int, dict[str, str]] = {}
        for row in csv.DictReader(f):
            figures = {k: v for k, v in row.items() if k.startswith("train/") and v}
            if figures:
                assert int(float(row["step"])) not in out, f"step {row['step']} logged twice"
                out[int(float(row["step"]))] = figures
    return out


def weights(root: Path) -> dict[str, torch.Tensor]:
    last = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(last, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stops-cache")


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    root = tmp_path_factory.mktemp("unbroken")
    code, output = fit(root, cache, "--trainer.max_steps", str(STEPS))
    assert code == 0, output[-3000:]
    return root


@pytest.fixture(scope="module")
def stopped_four_ways(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stopped")
    outputs: dict[str, str] = {"root": str(root)}

    def part(*extra: str) -> tuple[int, str]:
        """One part of the chain, on the unbroken run's schedule (length `STEPS`)."""
        return fit(root, cache, "--model.lr_decay_steps", str(STEPS), *extra)

    code, outputs["max_steps"] = part("--trainer.max_steps", "2")
    assert code == 0, outputs["max_steps"][-3000:]
    code, outputs["epoch_end"] = part("--ckpt_path", "last", "--trainer.max_steps", "3")
    assert code == 0, outputs["epoch_end"][-3000:]
    sigint = [
        SIGNAL_AT,
        "--trainer.callbacks.step",
        "4",
        "--trainer.callbacks.signum",
        str(int(signal.SIGINT)),
    ]
    code, outputs["sigint"] = part("--ckpt_path", "last", "--trainer.max_steps", "40", *sigint)
    assert code == 130, f"Ctrl-C exits with 130, got {code}: {outputs['sigint'][-3000:]}"
    sigterm = [
        SIGNAL_AT,
        "--trainer.callbacks.step",
        "5",
        "--trainer.callbacks.signum",
        str(int(signal.SIGTERM)),
    ]
    code, outputs["sigterm"] = part("--ckpt_path", "last", "--trainer.max_steps", "40", *sigterm)
    assert "SIGTERM received" in outputs["sigterm"], outputs["sigterm"][-3000:]
    code, outputs["hpc"] = part("--ckpt_path", "hpc", "--trainer.max_steps", str(STEPS))
    assert code == 0, outputs["hpc"][-3000:]
    return outputs


def test_every_stop_resumes_to_the_unbroken_run_bitwise(unbroken, stopped_four_ways):
    root = Path(stopped_four_ways["root"])
    want, got = rows(unbroken), rows(root)
    assert sorted(want) == list(range(1, STEPS + 1)), sorted(want)
    assert sorted(got) == sorted(want), f"steps logged after the stops: {sorted(got)}"
    differing = [step for step in want if got[step] != want[step]]
    assert not differing, f"steps that differ from the unbroken run: {differing}"
    a, b = weights(unbroken), weights(root)
    assert a.keys() == b.keys() and a
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(
        f"resume chain on configs/tiny.yaml: {len(want)} steps x {len(want[1])} figures "
        f"compared, {len(differing)} differing; {len(a)} weight tensors, max |diff| {diff}"
    )
    assert diff == 0.0, f"final weights differ by up to {diff:.3g}"


def test_a_resume_with_the_runs_own_settings_warns_of_nothing_replaced(stopped_four_ways):
    for part, output in stopped_four_ways.items():
        assert "model settings replace" not in output, f"{part}: {output[-2000:]}"


def test_the_run_keeps_one_folder_and_one_last_checkpoint_name(stopped_four_ways):
    root = Path(stopped_four_ways["root"])
    checkpoints = root / "logs" / "version_0" / "checkpoints"
    names = sorted(p.name for p in checkpoints.glob("last*.ckpt"))
    assert names == ["last.ckpt"], f"a resume renamed the last checkpoint: {names}"
    assert sorted(p.name for p in (root / "logs").iterdir()) == ["version_0"]


def test_ctrl_c_names_the_command_that_resumes(stopped_four_ways):
    output = stopped_four_ways["sigint"]
    assert "SIGINT received: stopped after optimiser step 4" in output, output[-2000:]
    assert "resume with: python -m safegrpo_pl fit --config configs/tiny.yaml" in output
    assert "--ckpt_path last" in output.split("resume with:")[1].splitlines()[0]
    assert "Traceback" not in output


def test_a_resume_that_would_train_nothing_says_so_and_fails(stopped_four_ways, cache):
    root = Path(stopped_four_ways["root"])
    code, output = fit(root, cache, "--ckpt_path", "last", "--trainer.max_steps", "6")
    assert code != 0, "a resume that trains nothing must not exit 0"
    assert "is at optimiser step 6 and --trainer.max_steps is 6: nothing to train" in output
    assert "Traceback" not in output
    assert len([line for line in output.splitlines() if "nothing to train" in line]) == 1


def test_a_second_ctrl_c_stops_at_once(tmp_path, cache):
    """The first SIGINT asks for a checkpoint at the end of the batch; a second one in the same
    batch stops the run at once (a KeyboardInterrupt, no checkpoint)."""
    twice = tmp_path / "twice.py"
    twice.write_text(
        "import os, signal\n"
        "from lightning.pytorch import Callback\n"
        "class TwoInterrupts(Callback):\n"
        "    def on_before_optimizer_step(self, trainer, pl_module, optimizer):\n"
        "        if trainer.global_step == 1:\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
    )
    code, output = fit(
        tmp_path / "run",
        cache,
        "--trainer.max_steps",
        "5",
        "--trainer.callbacks+=twice.TwoInterrupts",
        path=(str(tmp_path),),
    )
    assert code not in (0, 130), f"the second Ctrl-C must stop at once: {output[-2000:]}"
    assert "SIGINT received" not in output, "no checkpoint after a second Ctrl-C"


KILLER = '''
import errno, io, os, signal
import torch
from lightning.pytorch import Callback

class BreakTheWrite(Callback):
    """From optimiser step `step` on, the next checkpoint write fails: `kill` writes half the
    file and then kills the process (SIGKILL), `full` raises ENOSPC."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step < self.step:
            return
        real, how = torch.save, self.how

        def broken(obj, f, *args, **kwargs):
            if how == "full":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = broken
'''


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.mark.parametrize("how", ["kill", "full"])
def test_a_checkpoint_write_that_dies_keeps_the_previous_checkpoint(
    stopped_four_ways, cache, tmp_path, how
):
    """SIGKILL in the middle of writing `last.ckpt`, or a full disk: the previous `last.ckpt`
    is intact, `--ckpt_path last` resumes from it, and the same command then completes."""
    root = tmp_path / "run"
    shutil.copytree(stopped_four_ways["root"], root)
    (tmp_path / "breaker.py").write_text(KILLER)
    last = root / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert _step_of(last) == STEPS
    resume = ["--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 1)]
    breaker = ["--trainer.callbacks+=breaker.BreakTheWrite", "--trainer.callbacks.step", "1"]
    breaker += ["--trainer.callbacks.how", how]
    code, output = fit(root, cache, *resume, *breaker, path=(str(tmp_path),))
    if how == "kill":
        assert code == -signal.SIGKILL, f"expected the process killed: {code} {output[-2000:]}"
    else:
        assert code == 1, output[-2000:]
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert errors == [errors[0]] and f"cannot write checkpoint {last}" in errors[0], errors
        assert "No space left on device" in errors[0] and "Traceback" not in output
    assert _step_of(last) == STEPS, "the previous checkpoint was damaged"
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
    code, output = fit(root, cache, *resume)
    assert code == 0, output[-2000:]
    assert _step_of(last) == STEPS + 1
    assert sorted(p.name for p in last.parent.glob("*last*")) == ["last.ckpt"], "debris left"


KILL_IN_SAVE = '''
import os
import signal

import transformers

_save = transformers.PreTrainedModel.save_pretrained


def _save_then_die(self, folder, *args, **kwargs):
    """Write the folder, then die before whoever asked can publish it (only for folders
    under {under!r})."""
    _save(self, folder, *args, **kwargs)
    if {under!r} in str(folder):
        os.kill(os.getpid(), signal.SIGKILL)


transformers.PreTrainedModel.save_pretrained = _save_then_die
'''


def _killer_on_path(tmp_path: Path, under: str) -> tuple[str, ...]:
    """A `sitecustomize` that kills the process after `save_pretrained` writes a folder whose
    path holds `under`."""
    folder = tmp_path / "killer"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(KILL_IN_SAVE.replace("{under!r}", repr(under)))
    return (str(folder),)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_warmup_killed_while_saving_is_never_reused(tmp_path):
    """SIGKILL while the format warm-up writes its cache entry: nothing is published, and the
    same command trains the warm-up again instead of loading a half-written model."""
    cache, root = tmp_path / "cache", tmp_path / "run"
    steps = ["--trainer.max_steps", "1"]
    code, output = fit(root, cache, *steps, path=_killer_on_path(tmp_path, "/warmup/"))
    assert code == -signal.SIGKILL, f"expected the process killed: {code} {output[-2000:]}"
    published = [p for p in (cache / "warmup").iterdir() if not p.name.startswith(".")]
    assert published == [], f"a killed warm-up published {published}"
    code, output = fit(root, cache, *steps)
    assert code == 0, output[-2000:]
    assert "format warm-up: 20 steps" in output and "reusing the cached result" not in output


def test_an_export_killed_while_writing_keeps_the_previous_export(
    stopped_four_ways, cache, tmp_path
):
    """SIGKILL while the exported model (`checkpoints/model`) is rewritten at a checkpoint: the
    previous export is still there, whole, and the same command then replaces it."""
    root = tmp_path / "run"
    shutil.copytree(stopped_four_ways["root"], root)
    export = root / "logs" / "version_0" / "checkpoints" / "model"
    before = _contents(export)
    assert "config.json" in before
    resume = ["--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 1)]
    code, output = fit(root, cache, *resume, path=_killer_on_path(tmp_path, "/checkpoints/"))
    assert code == -signal.SIGKILL, f"expected the process killed: {code} {output[-2000:]}"
    assert _contents(export) == before, "the previous export was damaged"
    assert [p.name for p in export.parent.glob(".model-*")], "the killed writer's folder"
    inode = export.stat().st_ino
    code, output = fit(root, cache, *resume)
    assert code == 0, output[-2000:]
    # Written anew (the learning rate is 0 after the chain's 6-step schedule, so the weights,
    # and so the files, are the same as before).
    assert export.stat().st_ino != inode and _contents(export) == before
    assert [p.name for p in export.parent.glob(".model-*")] == [], "debris left"
