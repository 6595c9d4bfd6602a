"""The benchmarks by name: which reader opens each, and where each sits in the paper's table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safegrpo_pl.eval.benchmarks import (
    load_figstep,
    load_mm_safetybench,
    load_mossbench,
    load_siuo,
    load_vlguard,
)
from safegrpo_pl.eval.general import load_pope, load_scienceqa
from safegrpo_pl.eval.records import LoadedBenchmark

log = logging.getLogger(__name__)

# Sections of the paper's table, in order: each benchmark belongs to one.
JAILBREAK = ("figstep", "figstep-tiny", "vlguard", "mm-safetybench")
AWARENESS = ("siuo",)
OVER_SENSITIVITY = ("mossbench",)
GENERAL = ("pope", "scienceqa-img")
BENCHMARKS: tuple[str, ...] = JAILBREAK + AWARENESS + OVER_SENSITIVITY + GENERAL

DISPLAY_NAMES = {
    "figstep": "FigStep",
    "figstep-tiny": "FigStep (SafeBench-Tiny)",
    "vlguard": "VLGuard",
    "mm-safetybench": "MM-SafetyBench",
    "siuo": "SIUO",
    "mossbench": "MOSSBench",
    "pope": "POPE",
    "scienceqa-img": "ScienceQA-IMG",
}


@dataclass(frozen=True)
class LoadOptions:
    """How benchmarks are read.

    Attributes:
        on_bad_record: "raise" stops at the first unreadable record, naming it; "skip" drops
            such records and counts them (per kind, with ids) in the report.
        mm_safetybench_variant: MM-SafetyBench's image variant: SD_TYPO (the paper's usual
            setting), SD or TYPO.
        general_split: the parquet split read for POPE and ScienceQA-IMG.
        limit: keep only the first `limit` records of each benchmark (quick runs); None: all.
    """

    on_bad_record: Literal["raise", "skip"] = "raise"
    mm_safetybench_variant: str = "SD_TYPO"
    general_split: str = "test"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit is {self.limit}; expected >= 1, or null for every record")


def _loaders(options: LoadOptions) -> dict[str, Callable[[str, Path], LoadedBenchmark]]:
    bad = options.on_bad_record
    return {
        "figstep": lambda n, r: load_figstep(n, r, bad),
        "figstep-tiny": lambda n, r: load_figstep(n, r, bad),
        "vlguard": lambda n, r: load_vlguard(n, r, bad),
        "mm-safetybench": lambda n, r: load_mm_safetybench(
            n, r, bad, options.mm_safetybench_variant
        ),
        "siuo": lambda n, r: load_siuo(n, r, bad),
        "mossbench": lambda n, r: load_mossbench(n, r, bad),
        "pope": lambda n, r: load_pope(n, r, bad, options.general_split),
        "scienceqa-img": lambda n, r: load_scienceqa(n, r, bad, options.general_split),
    }


def load_benchmark(
    name: str, root: str | Path, options: LoadOptions = LoadOptions()
) -> LoadedBenchmark:
    """Read benchmark `name` from the folder (or parquet file) `root` of its public release."""
    loaders = _loaders(options)
    if name not in loaders:
        raise ValueError(f"benchmarks has unknown name {name!r}; known: {list(BENCHMARKS)}")
    loaded = loaders[name](name, Path(root).expanduser())
    if options.limit is not None:
        loaded.records = loaded.records[: options.limit]
    if loaded.dropped is not None and loaded.dropped.total:
        log.warning("benchmark %s: %s", name, loaded.dropped.summary())
    if not loaded.records:
        raise ValueError(
            f"benchmark {name!r} at {str(root)!r} has no readable record; check the folder"
        )
    return loaded
