"""Session-wide fixtures: tiny random Qwen models built offline once, loaded by path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from safegrpo_pl.policy.tiny_models import build_tiny_model

# Tiny models are overhead-bound: one thread is faster than two fighting over a shared CPU.
torch.set_num_threads(1)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on two cores: every process they start gets one
    # thread too (two threads per process would oversubscribe the cores, and OpenMP's
    # spinning threads then slow every process many times over).
    os.environ["OMP_NUM_THREADS"] = "1"


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
