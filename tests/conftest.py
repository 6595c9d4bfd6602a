"""Session-wide fixtures: tiny random Qwen models built offline once, loaded by path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No test reaches the model hub (there is no network here, and CI must not depend on one). Set
# before transformers and huggingface_hub are imported, which read it once: a hub lookup then
# fails at once instead of waiting on the network (23 s for one missing model).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from safegrpo_pl.policy.tiny_models import build_tiny_model

# Tiny models are overhead-bound: one thread is faster than two fighting over a shared CPU.
torch.set_num_threads(1)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on two cores: every process they start gets one
    # thread too (two threads per process would oversubscribe the cores, and OpenMP's
    # spinning threads then slow every process many times over).
    os.environ["OMP_NUM_THREADS"] = "1"


# The longest test files, longest first (measured under `make test`). `make test` runs whole
# files on two processes in collection order (`--dist loadfile --no-loadscope-reorder`): started
# first, they run beside the many short files instead of leaving one process alone at the end.
LONGEST_FIRST = (
    "test_learning.py",
    "test_resume_any_stop.py",
    "test_resume.py",
    "test_distributed.py",
    "test_plan.py",
    "test_scripts.py",
    "test_bench.py",
    "test_run_dirs.py",
    "test_errors.py",
    "test_eval_run.py",
    "test_cli.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--research", action="store_true", help="also run the research probes")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Put the files of LONGEST_FIRST first, in that order (the rest keep theirs), and skip the
    research probes unless --research is given."""
    missing = set(LONGEST_FIRST) - {p.name for p in Path(__file__).parent.glob("test_*.py")}
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FIRST names no file {sorted(missing)}")
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if not config.getoption("--research"):
        skip = pytest.mark.skip(reason="a research probe: `make research` runs it")
        for item in items:
            if "research" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build `tiny:` models into a per-session folder, never into the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("safegrpo_cache")
    os.environ["SAFEGRPO_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_qwen25vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL with its tokenizer and PIL image processor, saved to a folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_qwen3vl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL (deepstack, interleaved mrope), saved to a folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_qwen3_text_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random text-only Qwen3 causal LM (the model TRL can also run here)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3_text", "qwen3_text")


@pytest.fixture(scope="session", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_vl_path(request: pytest.FixtureRequest) -> Path:
    """Each tiny vision-language model in turn."""
    name = {"qwen2_5_vl": "tiny_qwen25vl_path", "qwen3_vl": "tiny_qwen3vl_path"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture
def run_main(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """`python -m safegrpo_pl ARGS` in this process, from the repository root, through the same
    entry point: returns (exit status, stdout, stderr). A process per command would spend most
    of its time importing torch and Lightning."""
    from safegrpo_pl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.chdir(Path(__file__).resolve().parents[1])
        monkeypatch.delenv("SAFEGRPO_DEBUG", raising=False)
        monkeypatch.setattr(sys, "argv", ["safegrpo_pl"])  # LightningCLI warns if both hold args
        try:
            main(list(args))
            status = 0
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        printed = capsys.readouterr()
        return status, printed.out, printed.err

    return run
