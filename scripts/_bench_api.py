"""Everything the benchmark takes from `safegrpo_pl`, in one place.

The library's modules are being reorganised (rollout and model helpers move between files):
when a name moves, fix its import here and every benchmark script follows. The scripts import
this module inside their functions, so that importing them (the unit tests do) stays cheap.

Beyond these names the benchmark relies only on `SafeGRPOModule`'s constructor arguments, the
`time/*` metrics its training step logs, and Lightning's public API, with one exception:
`sample_full_length` below.
"""

from __future__ import annotations

from typing import Any

from safegrpo_pl.core.files import default_cache_dir
from safegrpo_pl.core.rewards import safety_reward
from safegrpo_pl.demo.dataset import DemoConfig, demo_corpus, make_demo_split
from safegrpo_pl.policy.inputs import PromptBatch, PromptEncoder
from safegrpo_pl.policy.model import (
    DecodeIds,
    LoraSettings,
    PolicySettings,
    eos_token_ids,
    load_policy,
    vision_token_ids,
)
from safegrpo_pl.policy.tiny_models import TinyModelSpec, build_tiny_model
from safegrpo_pl.rollout.logprobs import completion_logprobs
from safegrpo_pl.rollout.sampling import SamplingSettings, sample_groups
from safegrpo_pl.train.module import SafeGRPOModule

__all__ = [
    "DecodeIds",
    "DemoConfig",
    "LoraSettings",
    "PolicySettings",
    "PromptBatch",
    "PromptEncoder",
    "SafeGRPOModule",
    "SamplingSettings",
    "TinyModelSpec",
    "build_tiny_model",
    "completion_logprobs",
    "default_cache_dir",
    "demo_corpus",
    "eos_token_ids",
    "load_policy",
    "make_demo_split",
    "safety_reward",
    "sample_full_length",
    "sample_groups",
    "vision_token_ids",
]


def sample_full_length(module: Any) -> None:
    """Make a configured `SafeGRPOModule` suppress its EOS ids too, so that every completion has
    exactly `max_new_tokens` tokens (TRL is given the same ids through `suppress_tokens`).

    The module has no constructor argument for suppressed tokens, so this sets the ids that
    `configure_model` stores on its `PolicyRunner` (`decode_ids`): the one place
    the benchmark reaches into the module. Call it after `module.configure_model()`.
    """
    runner = module.runner
    runner.decode_ids = runner.decode_ids.never_ending()
