"""Bounded memory: rollout chunking changes memory only, and memory follows the chunk.

Memory is measured as the peak of live torch allocations during a call, from the profiler's
allocation events (`torch.profiler` with `profile_memory=True` records every allocation and
free of torch's CPU allocator, with its size and time). `tracemalloc` would not do: it sees only
Python's own allocator, and torch allocates tensor storage in C++.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.data.datamodule import SafeTagDataModule
from safegrpo_pl.demo.dataset import DemoConfig
from safegrpo_pl.policy.inputs import PromptEncoder
from safegrpo_pl.policy.model import LoraSettings, PolicySettings
from safegrpo_pl.rollout.chunking import pad_right, rollout_chunks
from safegrpo_pl.rollout.prefix_attention import INITIAL_CAPACITY, _GroupDecodeLayer
from safegrpo_pl.rollout.sampling import SamplingSettings
from safegrpo_pl.train.module import SafeGRPOModule
from safegrpo_pl.train.policy_runner import PolicyRunner

# -- what a training step saw, with and without chunking -----------------------------------


class RecordingModule(SafeGRPOModule):
    """Keeps the rollouts, frozen log-probs, step figures and first gradients of a run; a
    made-up reward of the text gives the random policy something to learn."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, list[Any]] = {"rollout": [], "frozen": [], "steps": []}
        self.first_grads: dict[str, torch.Tensor] = {}

    def sample(self, batch, group_size, settings, keep_logprobs=False):
        rollout = super().sample(batch, group_size, settings, keep_logprobs)
        self.seen["rollout"].append(rollout)
        return rollout

    def score(self, batch, rollout):
        parts = super().score(batch, rollout)
        return [
            replace(p, total=(len(t) % 5) / 4) for p, t in zip(parts, rollout.texts, strict=True)
        ]

    def frozen_logprobs(self, batch, rollout, *, reference, skip=()):
        values = super().frozen_logprobs(batch, rollout, reference=reference, skip=skip)
        self.seen["frozen"].append(values.clone())
        return values

    def optimise(self, *args: Any, **kwargs: Any):
        figures = super().optimise(*args, **kwargs)
        self.seen["steps"].append({k: v.detach().clone() for k, v in figures.as_dict().items()})
        return figures

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.first_grads:
            self.first_grads = {
                n: p.grad.clone() for n, p in self.policy.named_parameters() if p.grad is not None
            }


class MovedLoraModule(RecordingModule):
    """LoRA-B starts at zero, which would hide any dropout on the adapters' input: give it
    weights, as after some training."""

    def configure_model(self) -> None:
        fresh = self.policy is None
        super().configure_model()
        generator = torch.Generator().manual_seed(3)
        for name, param in self.policy.named_parameters():
            if fresh and "lora_B" in name:
                param.data.normal_(0.0, 0.5, generator=generator)


def _run(path: Path, root: Path, steps: int, **kwargs: Any) -> RecordingModule:
    policy = PolicySettings(name_or_path=str(path), lora=kwargs.pop("lora", None))
    settings: dict[str, Any] = dict(
        policy=policy,
        group_size=2,
        lr=1e-2,
        kl_coef=0.05,
        mini_batch_size=2,
        sampling=SamplingSettings(max_new_tokens=8),
    )
    cls = kwargs.pop("cls", RecordingModule)
    settings.update(kwargs)
    module = cls(**settings)
    data = SafeTagDataModule(
        dataset="demo",
        processor=str(path),
        batch_size=4,
        demo=DemoConfig(num_train=8, num_val=2, num_test=2),
    )
    L.seed_everything(0)
    L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=root,
        logger=CSVLogger(root, name="logs", version=0),
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(module, data)
    return module


def test_chunking_changes_neither_samples_nor_logprobs_nor_loss_nor_gradient(
    tiny_qwen25vl_path, tmp_path
):
    # 4 prompts per rollout in 2 mini-batches: the old pass runs (for the second one), and
    # the reference pass too (kl_coef > 0); two rollouts, so the second sees moved weights.
    whole = _run(tiny_qwen25vl_path, tmp_path / "whole", 4)
    chunked = _run(tiny_qwen25vl_path, tmp_path / "chunked", 4, rollout_micro_batch_size=3)
    assert len(whole.seen["rollout"]) == 2 and len(whole.seen["frozen"]) == 4
    for a, b in zip(whole.seen["rollout"], chunked.seen["rollout"], strict=True):
        assert a.texts == b.texts
        assert torch.equal(a.completion_ids, b.completion_ids)
        assert torch.equal(a.completion_mask, b.completion_mask)
    assert len({t for r in whole.seen["rollout"] for t in r.texts}) > 4, "samples all alike"
    for a, b in zip(whole.seen["frozen"], chunked.seen["frozen"], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for a, b in zip(whole.seen["steps"], chunked.seen["steps"], strict=True):
        for key in ("loss", "kl", "grad_norm"):
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    assert whole.first_grads and whole.first_grads.keys() == chunked.first_grads.keys()
    assert any(g.abs().max() > 1e-4 for g in whole.first_grads.values()), "no gradient"
    for name, grad in whole.first_grads.items():
        torch.testing.assert_close(chunked.first_grads[name], grad, atol=1e-6, rtol=1e-4)


def test_ratio_is_exactly_one_at_the_first_mini_batch_with_lora_dropout(
    tiny_qwen25vl_path, tmp_path
):
    # lr 0: the weights never move, so every mini-batch's ratio would be 1 if the old pass
    # (eval mode) and the training pass (train mode) computed the same function; LoRA
    # dropout 0.5 in the training pass would put it far from 1.
    lora = LoraSettings(r=4, alpha=8, dropout=0.5)
    module = _run(tiny_qwen25vl_path, tmp_path, 1, lora=lora, lr=0.0, cls=MovedLoraModule)
    first, second = module.seen["steps"]
    assert first["ratio_min"].item() == 1.0 and first["ratio_max"].item() == 1.0
    assert abs(second["ratio_min"].item() - 1) < 1e-5 and abs(second["ratio_max"].item() - 1) < 1e-5


def test_the_old_pass_skips_the_first_mini_batch_and_fills_it_from_its_step(
    tiny_qwen25vl_path, tmp_path
):
    module = _run(tiny_qwen25vl_path, tmp_path, 2, num_iterations=1)
    old = module.seen["frozen"][0]  # the old pass comes first, then the reference pass
    assert torch.all(old[:4] == 0) and torch.any(old[4:] != 0)  # prompts 0-1 are rows 0-3


# -- memory follows the chunk ---------------------------------------------------------------


def _records(count: int) -> list[SafetyRecord]:
    words = ["how", "do", "I", "bake", "a", "cake", "with", "apples", "and", "cream", "today"]
    return [
        SafetyRecord(
            Image.new("RGB", (64, 64), (40 * i % 255, 90, 200)),
            " ".join(words[: 3 + i % 8]),
            "safe",
            "safe",
            "safe",
            id=f"r{i}",
            source="test",
        )
        for i in range(count)
    ]


def _peak_bytes(fn: Any) -> int:
    """Peak of live torch allocations (bytes) during `fn()`, above what was live before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Any:
    """A tiny Qwen2.5-VL with 4 layers of width 128: 2 KiB of keys/values per token, so the
    cache dominates the few bytes per token of the sampled ids (which do grow with N)."""
    from safegrpo_pl.policy.model import load_policy
    from safegrpo_pl.policy.tiny_models import TinyModelSpec, build_tiny_model

    spec = TinyModelSpec(arch="qwen2_5_vl", hidden_size=128, num_layers=4, num_heads=4)
    path = str(build_tiny_model(tmp_path_factory.mktemp("wide"), spec=spec))
    model = load_policy(path).eval()
    encoder = PromptEncoder.from_pretrained(path, guide=None)
    runner = PolicyRunner(model, encoder.tokenizer, None)
    runner.decode_ids = runner.decode_ids.never_ending()  # full length
    return runner, encoder


def _measure(runner: Any, encoder: Any, prompts: int, chunk: int | None) -> tuple[int, int]:
    """Peak bytes of sampling and of the old-log-prob pass for `prompts` prompts."""
    runner, batch = runner, encoder(_records(prompts))
    runner.rollout_chunk = chunk
    settings = SamplingSettings(max_new_tokens=96)
    torch.manual_seed(0)
    rollout = runner.sample(batch, 4, settings)
    assert rollout.completion_ids.shape == (prompts * 4, 96)
    sampling = _peak_bytes(lambda: runner.sample(batch, 4, settings))
    scoring = _peak_bytes(
        lambda: runner.frozen_logprobs(batch, rollout, reference=False, temperature=1.0)
    )
    return sampling, scoring


def test_peak_memory_grows_with_the_chunk_not_with_the_rollout_batch(runner):
    small = _measure(*runner, prompts=2, chunk=2)
    large_chunked = _measure(*runner, prompts=8, chunk=2)
    large_whole = _measure(*runner, prompts=8, chunk=None)
    for name, s, c, w in zip(
        ("sampling", "scoring"), small, large_chunked, large_whole, strict=True
    ):
        # 4x the prompts at the same chunk: about the same peak (the outputs grow, a little)
        assert c < 1.3 * s, f"{name}: {c} bytes for 8 prompts in chunks of 2 vs {s} for 2"
        # 4x the prompts at once: the peak grows with them
        assert w > 2.5 * s, f"{name}: {w} bytes for 8 prompts at once vs {s} for 2"


def test_decode_cache_grows_with_the_tokens_generated_not_the_limit():
    prefix = torch.randn(2, 2, 5, 8)  # (B, kv_heads, L, head_dim)
    layer = _GroupDecodeLayer(prefix, prefix.clone(), rows=6, capacity=4096)
    per_token = 2 * 6 * 2 * 8 * 4  # keys+values, N=6 rows, 2 kv heads, dim 8, float32
    written = []
    for step in range(150):
        key = torch.full((6, 2, 1, 8), float(step))
        keys, values = layer.update(key, key + 0.5)
        written.append(step)
        held = layer.held_bytes()
        assert held <= 2 * max(step + 1, INITIAL_CAPACITY) * per_token
    assert keys.shape[-2] == 150 and torch.equal(keys[0, 0, :, 0], torch.arange(150.0))
    assert torch.equal(values[5, 1, :, 7], torch.arange(150.0) + 0.5)
    assert layer.held_bytes() < 4096 * per_token / 10
    with pytest.raises(RuntimeError, match="holds 4096 new tokens"):
        _GroupDecodeLayer(prefix, prefix, 6, 4096).update(torch.zeros(6, 2, 4097, 8), prefix)


def test_chunks_hold_whole_prompts_and_bad_sizes_name_the_setting():
    assert rollout_chunks(5, 2) == [[0, 1], [2, 3], [4]]
    assert rollout_chunks(3, None) == [[0, 1, 2]]
    with pytest.raises(ValueError, match=r"model\.rollout_micro_batch_size"):
        rollout_chunks(4, 0)
    padded = pad_right([torch.ones(1, 2, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)], 7)
    assert padded.tolist() == [[1, 1, 7], [1, 1, 1], [1, 1, 1]]


# -- the LM head: no full-vocabulary logits kept for backward -------------------------------

QWEN_VOCAB = 151_669  # Qwen3's tokenizer: 151,643 BPE tokens + 26 added


def test_recomputed_lm_head_drops_the_kept_logits_from_the_training_peak(monkeypatch):
    """At Qwen's vocabulary the logits kept for backward dwarf a tiny model: recomputing each
    chunk's logits in backward takes about their size off the peak of forward + backward."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from safegrpo_pl.policy.inputs import PromptBatch
    from safegrpo_pl.rollout import logprobs

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
    )
    model = Qwen3ForCausalLM(config)
    group, steps = 4, 64
    record = SafetyRecord(None, "p", "safe", "safe", "safe", id="r0", source="test")
    batch = PromptBatch([record], torch.randint(0, QWEN_VOCAB, (1, 8)), torch.ones(1, 8))
    ids = torch.randint(0, QWEN_VOCAB, (group, steps))
    mask = torch.ones(ids.shape)
    chunk = 16  # tokens per LM-head chunk: 16 chunks over the 256 scored tokens
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", chunk * QWEN_VOCAB)

    def step(recompute: bool) -> None:
        model.zero_grad(set_to_none=True)
        logp = logprobs.completion_logprobs(
            model, batch, ids, mask, group_size=group, recompute_head=recompute
        )
        logp.sum().backward()

    step(True)  # allocate the gradients once: both runs then write into them
    kept, recomputed = _peak_bytes(lambda: step(False)), _peak_bytes(lambda: step(True))
    logits = group * steps * QWEN_VOCAB * 4  # 155 MB of float32 logits
    saved = kept - recomputed
    # kept: every chunk's logits, then a chunk's gradient and softmax beside them in backward;
    # recomputed: those two and the chunk's logits (measured: 186 MiB vs 19 MiB)
    assert 0.9 * logits < saved < 1.25 * logits, (
        f"peak {kept / 2**20:.0f} MiB kept vs {recomputed / 2**20:.0f} MiB recomputed: saved "
        f"{saved / 2**20:.0f} MiB, the logits are {logits / 2**20:.0f} MiB"
    )


@pytest.mark.parametrize(("grad", "fused"), [(False, True), (True, True), (True, False)])
def test_shared_prompt_drops_the_repeated_prompt_keys_values_from_the_scoring_peak(
    monkeypatch, grad, fused
):
    """A long prompt and G 8: scoring over one copy of the prompt's keys/values takes the
    repeated copies (G - 1 of every G) off the peak of the no-grad log-prob pass, and off the
    keys/values the training forward saves for backward. `fused` False: the plain-PyTorch
    tiles (decode steps, GPUs) instead of the fused CPU kernel. The fused backward also keeps
    no tile of scores (the tiled one and the repeated path's kernel do), so it saves more."""
    from test_rollout import _repeated_cache_hidden
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from safegrpo_pl.policy.inputs import PromptBatch
    from safegrpo_pl.rollout import logprobs, prefix_attention

    if not fused:
        monkeypatch.setattr(prefix_attention, "FUSED_CPU_KERNEL", False)

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
    )
    model = Qwen3ForCausalLM(config).train(grad)
    group, length, steps = 8, 1024, 16
    record = SafetyRecord(None, "p", "safe", "safe", "safe", id="r0", source="test")
    batch = PromptBatch([record], torch.randint(0, 512, (1, length)), torch.ones(1, length))
    ids = torch.randint(0, 512, (group, steps))
    mask = torch.ones(ids.shape)

    def score() -> None:
        model.zero_grad(set_to_none=False)
        with torch.set_grad_enabled(grad):
            logp = logprobs.completion_logprobs(model, batch, ids, mask, group_size=group)
        if grad:
            logp.sum().backward()

    score()  # allocate the gradients once: both runs then write into them
    shared = _peak_bytes(score)
    monkeypatch.setattr(logprobs, "_shared_prefix_hidden", _repeated_cache_hidden)
    score()
    repeated = _peak_bytes(score)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 64 * 4  # float32
    copies = (group - 1) * length * kv_per_token  # 28 MiB
    saved = repeated - shared
    most = float("inf") if grad and fused else 1.25 * copies
    assert 0.75 * copies < saved < most, (
        f"peak {repeated / 2**20:.1f} MiB repeated vs {shared / 2**20:.1f} MiB shared: saved "
        f"{saved / 2**20:.1f} MiB, the prompt's G - 1 extra copies are {copies / 2**20:.1f} MiB"
    )
