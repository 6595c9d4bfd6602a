"""The preemption callback's pieces (the signals themselves are tested end to end, through the
command line, in `test_resume.py`)."""

from __future__ import annotations

from safegrpo_pl.run.preemption import hpc_checkpoint_path, requeue_command


def test_the_checkpoint_takes_the_next_hpc_number(tmp_path):
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_1.ckpt").touch()
    (tmp_path / "hpc_ckpt_7.ckpt").touch()
    assert hpc_checkpoint_path(tmp_path).name == "hpc_ckpt_8.ckpt"


def test_the_requeue_command_names_the_slurm_job_or_array_task():
    assert requeue_command({"SLURM_JOB_ID": "123"}) == ["scontrol", "requeue", "123"]
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}
    assert requeue_command(array) == ["scontrol", "requeue", "7_2"]
    assert requeue_command({}) is None
    assert requeue_command({"SLURM_JOB_ID": "1; rm -rf /"}) is None
