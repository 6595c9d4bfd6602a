"""Run a command in a process group of its own, and kill the whole group when it outlives its
time: a hung rank ignores SIGTERM, so a multi-process test must kill, never wait forever."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def run_in_own_group(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """(return code, stdout and stderr together). On timeout every process of the group is
    killed and `subprocess.TimeoutExpired` is raised with the output so far."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=output) from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # a child a crashed launcher left
            os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output
