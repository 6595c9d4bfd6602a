"""The train pass against the machine's limit: achieved FLOP/s of the policy forward+backward.

Measured in one process (`scripts/_bench_jobs.py`, job kind "mfu"), in this order, alternated:
- **matmul peak**: a `torch.matmul` loop over every linear layer's shapes at the pass's token
  count: the forward product and the two backward products (input and weight gradients). The
  peak is their total FLOPs over their total time: dense-matmul FLOP/s at exactly these shapes,
  on this machine, under this run's load and threads.
- **ours**: `completion_logprobs` with grad (the module's training pass), a token-mean of the
  log-probs as the loss, backward.
- **plain**: a plain transformers forward over prompt+completion, cross-entropy on the
  completion positions, backward.
Both passes see the same model (a text-only Qwen3 wide enough for matmuls to dominate) and the
same rows of prompt+completion tokens (one completion per prompt: G = 1, so neither can skip
prompt work the other does). The FLOP count is the same for both: 6 x (parameters of the
linear layers) x tokens, with the LM head counted on the scored positions only, plus the causal
attention products (6 x layers x tokens x attended length x query width, halved for causality).
Times are process CPU seconds (robust to other jobs on a shared machine; equal to wall time on
an idle one with the configured threads), medians over the repeats.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import _bench_api as api
import _bench_stats as stats
import torch


def _linear_shapes(model: Any) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every linear layer, the LM head last."""
    head = model.get_output_embeddings()
    shapes = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    ]
    return [*shapes, ("lm_head", head.in_features, head.out_features)]


def pass_flops(model: Any, rows: int, prompt: int, completion: int) -> float:
    """FLOPs of one forward+backward over `rows` x (prompt + completion) tokens (module doc)."""
    tokens = rows * (prompt + completion)
    shapes = _linear_shapes(model)
    body = sum(i * o for name, i, o in shapes if name != "lm_head")
    head = shapes[-1][1] * shapes[-1][2]
    config = model.config
    width = config.num_attention_heads * getattr(
        config, "head_dim", config.hidden_size // config.num_attention_heads
    )
    seq = prompt + completion
    attention = 6 * config.num_hidden_layers * rows * seq * seq * width  # QK^T + PV, causal half
    return 6.0 * body * tokens + 6.0 * head * rows * completion + attention


def _cpu_seconds(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def matmul_peak(model: Any, tokens: int, repeats: int) -> dict[str, float]:
    """FLOP/s of the forward and backward matmuls of every linear layer at `tokens` rows: each
    distinct shape timed once and weighted by how many layers have it."""
    counts = Counter((i, o) for _, i, o in _linear_shapes(model))
    total_flops, total_s, best = 0.0, 0.0, 0.0
    for (inputs, outputs), count in sorted(counts.items()):
        x = torch.randn(tokens, inputs)
        w = torch.randn(outputs, inputs)
        dy = torch.randn(tokens, outputs)

        def products(x=x, w=w, dy=dy) -> None:
            torch.matmul(x, w.t())  # forward
            torch.matmul(dy, w)  # input gradient
            torch.matmul(dy.t(), x)  # weight gradient

        products()  # warm-up
        seconds = stats.median(_cpu_seconds(products) for _ in range(repeats))
        flops = 6.0 * inputs * outputs * tokens
        best = max(best, flops / seconds)
        total_flops += flops * count
        total_s += seconds * count
    return {"matmul_peak_flops": total_flops / total_s, "best_shape_flops": best}


def _batch(rows: int, prompt: int, completion: int, vocab: int, seed: int) -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(10, vocab - 64, (rows, prompt), generator=generator)
    ids = torch.randint(10, vocab - 64, (rows, completion), generator=generator)
    batch = api.PromptBatch(
        records=[None] * rows, input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids)
    )
    return batch, ids, torch.ones(ids.shape)


def _ours(model: Any, batch: Any, ids: Any, mask: Any) -> Callable[[], None]:
    def run() -> None:
        logp = api.completion_logprobs(model, batch, ids, mask, group_size=1)
        (-(logp * mask).sum() / mask.sum()).backward()
        model.zero_grad(set_to_none=True)

    return run


def _plain(model: Any, batch: Any, ids: Any) -> Callable[[], None]:
    full = torch.cat([batch.input_ids, ids], 1)
    start = batch.input_ids.shape[1] - 1

    def run() -> None:
        logits = model(input_ids=full, attention_mask=torch.ones_like(full)).logits
        scored = logits[:, start : start + ids.shape[1]]
        loss = torch.nn.functional.cross_entropy(scored.reshape(-1, scored.shape[-1]), ids.ravel())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def train_pass_efficiency(
    model_path: str, rows: int, prompt: int, completion: int, repeats: int, seed: int
) -> dict[str, Any]:
    """The figures of the module doc: `train_pass_mfu` and `train_pass_vs_plain`, with inputs."""
    model = api.load_policy(model_path)  # float32, all weights trainable, train mode
    batch, ids, mask = _batch(rows, prompt, completion, model.config.vocab_size, seed)
    ours, plain = _ours(model, batch, ids, mask), _plain(model, batch, ids)
    ours(), plain()  # warm-up
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for repeat in range(repeats):
        order = (("ours", ours), ("plain", plain))
        for name, run in order if repeat % 2 == 0 else order[::-1]:
            times[name].append(_cpu_seconds(run))
    peak = matmul_peak(model, rows * (prompt + completion), repeats)
    flops = pass_flops(model, rows, prompt, completion)
    ours_s, plain_s = stats.median(times["ours"]), stats.median(times["plain"])
    return {
        "rows": rows,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "parameters": sum(p.numel() for p in model.parameters()),
        "pass_flops": flops,
        **peak,
        "ours_s": times["ours"],
        "plain_s": times["plain"],
        "ours_flops": flops / ours_s,
        "plain_flops": flops / plain_s,
        "train_pass_mfu": flops / ours_s / peak["matmul_peak_flops"],
        "plain_mfu": flops / plain_s / peak["matmul_peak_flops"],
        "train_pass_vs_plain": plain_s / ours_s,
    }
