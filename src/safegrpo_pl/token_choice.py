"""Choosing the next token: temperature-scaled logits filtered by top-k / top-p, then a draw
(pure tensor functions, used by the decode loop in `safegrpo_pl.sampling`).

Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (the token that
crosses the threshold is kept), after temperature and top-k, as `transformers` orders them.
The draw uses exponential noise (`exponential_draws`: the same numbers as `exponential_`,
with a vectorised logarithm), one generator per row when several are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only: sampling imports this module
    from safegrpo_pl.sampling import SamplingSettings

Generators = torch.Generator | Sequence[torch.Generator] | None


def filter_logits(logits: Tensor, *, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set logits outside the top-k / top-p support to -inf (top-k first, then top-p).

    Args:
        logits: (N, V) float logits, already divided by the temperature.
        top_k: keep the k largest per row (0 = off); ties at the k-th value are kept.
        top_p: keep the smallest set of most likely tokens with mass >= top_p (1.0 = off).

    Returns:
        (N, V) a new tensor; the input is not modified.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (N, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the most likely token always stays (0 < top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next_tokens(
    logits: Tensor, settings: SamplingSettings, generator: Generators = None
) -> Tensor:
    """Pick one token per row: argmax when greedy, else a draw after temperature/top-k/top-p.

    Sampling uses the exponential-race form (argmax of p / E, E ~ Exp(1)), which draws from p
    exactly like `multinomial` but needs no normalisation or host sync (draws: `exponential_draws`).

    Args:
        logits: (N, V) float logits (suppressed tokens already at -inf).
        settings: the sampling settings.
        generator: a torch generator on the logits' device, for reproducible draws, or one per
            equal block of rows (`exponential_draws`).

    Returns:
        (N,) long token ids.
    """
    if not settings.do_sample:
        return logits.argmax(-1)
    if settings.temperature != 1.0:
        logits = logits / settings.temperature
    logits = filter_logits(logits, top_k=settings.top_k, top_p=settings.top_p)
    probs = logits.softmax(-1)  # (N, V), a fresh tensor: divided in place
    return probs.div_(exponential_draws(probs, generator)).argmax(-1)


def exponential_draws(like: Tensor, generator: Generators = None) -> Tensor:
    """Exp(1) draws shaped and typed like `like`: the numbers `Tensor.exponential_` would give.

    A sequence of k generators splits the rows into k equal blocks, each drawn from its own
    generator (one per prompt: a prompt's draws then do not depend on the other rows).

    On CPU `exponential_` computes -log1p(-U) on float64 uniforms one element at a time
    (~30 ns each, a tenth of a small model's decode step). For float32, drawing the same
    uniforms with `uniform_` (the same generator stream) and taking log1p in one vectorised op
    costs about half and gives the same float32 draws: the vectorised and scalar float64 log1p
    may differ in the last bit, which rounding to float32 hides in all but ~1 draw in 10^8 (the
    tests check them bit for bit). Other dtypes and devices use `exponential_` itself.
    """
    if isinstance(generator, Sequence):
        blocks = like.split(like.shape[0] // len(generator), 0)
        return torch.cat([exponential_draws(b, g) for b, g in zip(blocks, generator, strict=True)])
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty_like(like).exponential_(1.0, generator=generator)
    uniform = torch.empty(like.shape, dtype=torch.float64).uniform_(generator=generator)
    return uniform.neg_().log1p_().neg_().float()
