"""`StepTimer`: wall-clock seconds per phase of a GRPO step, logged as `time/<phase>`."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StepTimer:
    """Seconds per named phase, summed until `pop` (CUDA-synchronised at both ends, so a phase
    is charged for the kernels it launched, not for the ones before it)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The phases timed since the last call, and a fresh start."""
        out, self.seconds = dict(self.seconds), defaultdict(float)
        return out
