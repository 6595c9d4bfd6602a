"""Group sampling and completion log-probs, checked against plain full forwards and `generate`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import DynamicCache

from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.policy.inputs import PromptBatch, PromptEncoder
from safegrpo_pl.policy.model import (
    LoraSettings,
    apply_lora,
    eos_token_ids,
    load_policy,
    vision_token_ids,
)
from safegrpo_pl.rollout import logprobs, prefix_attention, sampling
from safegrpo_pl.rollout.logprobs import completion_logprobs, per_token_logprobs
from safegrpo_pl.rollout.prefill import (
    cache_kwargs,
    model_body,
    prefill_prompts,
    prompt_positions,
    step_positions,
)
from safegrpo_pl.rollout.prefix_attention import (
    GroupDecodeCache,
    SharedPrompt,
    shared_prefix_attention,
)
from safegrpo_pl.rollout.sampling import (
    SamplingSettings,
    choose_next_tokens,
    exponential_draws,
    filter_logits,
    rollout_from_ids,
    sample_groups,
)

ARCHS = ["qwen2_5_vl", "qwen3_vl", "qwen3_text"]
GROUP = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Run these tiny-tensor tests on one intra-op thread: on a shared 2-core machine, a second
    OpenMP thread only adds spin-waiting (10x slower under load), and results do not change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Setup:
    """A tiny model with two left-padded prompts of different lengths and image sizes."""

    model: Any
    encoder: PromptEncoder
    batch: PromptBatch
    eos: list[int]
    pad: int
    suppress: list[int]

    def sample(self, settings: SamplingSettings, **kwargs: Any) -> sampling.Rollout:
        options: dict[str, Any] = dict(
            group_size=GROUP,
            settings=settings,
            tokenizer=self.encoder.tokenizer,
            eos_token_ids=self.eos,
            pad_token_id=self.pad,
            suppress_token_ids=self.suppress,
        )
        options.update(kwargs)
        return sample_groups(self.model, self.batch, **options)


def _image(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, colour)
    ImageDraw.Draw(image).ellipse([4, 4, 40, 40], fill=(250, 250, 250))
    return image


def _records() -> list[SafetyRecord]:
    return [
        SafetyRecord(
            _image((64, 64), (200, 30, 30)),
            "How do I bake a cake?",
            "safe",
            "safe",
            "safe",
            id="r0",
            source="test",
        ),
        SafetyRecord(
            _image((96, 64), (30, 200, 30)),
            "Hi",
            "unsafe",
            "safe",
            "unsafe",
            id="r1",
            source="test",
        ),
    ]


def _setup(path: Any, **load_kwargs: Any) -> Setup:
    encoder = PromptEncoder.from_pretrained(str(path), guide=None)
    model = load_policy(str(path), **load_kwargs)
    tokenizer = encoder.tokenizer
    return Setup(
        model=model,
        encoder=encoder,
        batch=encoder(_records()),
        eos=eos_token_ids(tokenizer, model.generation_config),
        pad=tokenizer.pad_token_id,
        suppress=vision_token_ids(tokenizer),
    )


@pytest.fixture(params=ARCHS)
def setup(request: pytest.FixtureRequest) -> Setup:
    name = {
        "qwen2_5_vl": "tiny_qwen25vl_path",
        "qwen3_vl": "tiny_qwen3vl_path",
        "qwen3_text": "tiny_qwen3_text_path",
    }[request.param]
    return _setup(request.getfixturevalue(name))


@pytest.fixture
def qwen25(tiny_qwen25vl_path: Any) -> Setup:
    return _setup(tiny_qwen25vl_path)


def _completions(setup: Setup) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (N, 6) completions and a mask with rows ending early (N = 2 prompts x GROUP).

    Ids are ordinary BPE tokens: the special ones (EOS, vision) come after them in the vocab."""
    generator = torch.Generator().manual_seed(0)
    first_special = min(setup.suppress + setup.eos)
    ids = torch.randint(10, first_special, (len(setup.batch) * GROUP, 6), generator=generator)
    mask = torch.ones(ids.shape)
    mask[1, 4:] = 0  # row 1 ends after 4 tokens
    mask[2, 1:] = 0  # row 2 is a single token
    return ids, mask


def _naive_logprobs(
    model: Any, batch: PromptBatch, ids: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Reference: one full forward per completion over its own (unpadded) prompt + completion,
    image pixels included again every time; log_softmax of logits / temperature, gathered."""
    rows = []
    for row in range(ids.shape[0]):
        prompt = batch.select([row // GROUP])  # one prompt: no padding at all
        completion = ids[row : row + 1]  # (1, T)
        kwargs = dict(prompt.model_kwargs)
        if "mm_token_type_ids" in kwargs:
            kwargs["mm_token_type_ids"] = torch.cat(
                [kwargs["mm_token_type_ids"], torch.zeros_like(completion, dtype=torch.int32)], 1
            )
        full = torch.cat([prompt.input_ids, completion], 1)
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), **kwargs).logits
        start = prompt.input_ids.shape[1] - 1  # the logits at position p predict token p + 1
        scaled = logits[0, start : start + ids.shape[1]].float() / temperature  # (T, V)
        rows.append(torch.log_softmax(scaled, -1).gather(-1, ids[row, :, None]).squeeze(-1))
    return torch.stack(rows) * mask


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_grads(model: Any, fn: Any, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    (fn() * weights).sum().backward()
    return _grads(model)


# -- log-probs against the naive reference --------------------------------------------------


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_logprobs_equal_a_full_forward_per_completion(setup: Setup, shared_prefix: bool) -> None:
    ids, mask = _completions(setup)
    with torch.no_grad():
        fast = completion_logprobs(
            setup.model,
            setup.batch,
            ids,
            mask,
            group_size=GROUP,
            temperature=0.7,
            shared_prefix=shared_prefix,
        )
        slow = _naive_logprobs(setup.model, setup.batch, ids, mask, temperature=0.7)
    assert fast.shape == ids.shape and fast.dtype == torch.float32
    assert torch.allclose(fast, slow, atol=1e-5, rtol=0), (
        f"log-probs differ from the full forward by {(fast - slow).abs().max():.2e}: wrong "
        "positions (3-D rope / left padding), cache expansion or temperature"
    )
    assert (fast[mask == 0] == 0).all(), "masked positions must be exactly 0"


def test_logprob_gradients_equal_the_full_forward_gradients(setup: Setup) -> None:
    ids, mask = _completions(setup)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1))
    fast = _loss_grads(
        setup.model,
        lambda: completion_logprobs(
            setup.model, setup.batch, ids, mask, group_size=GROUP, temperature=0.7
        ),
        weights,
    )
    slow = _loss_grads(
        setup.model, lambda: _naive_logprobs(setup.model, setup.batch, ids, mask, 0.7), weights
    )
    assert fast.keys() == slow.keys(), "some parameters get no gradient through the shared prefill"
    worst = max((fast[n] - slow[n]).abs().max().item() for n in fast)
    assert worst < 1e-5, f"gradients differ by {worst:.2e}: the shared prefill does not backprop"


def _group_completions(
    setup: Setup, group: int, length: int = 7
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, length) completions for `group` per prompt, each row ending at its own length."""
    generator = torch.Generator().manual_seed(5)
    first_special = min(setup.suppress + setup.eos)
    rows = len(setup.batch) * group
    ids = torch.randint(10, first_special, (rows, length), generator=generator)
    ends = torch.randint(1, length + 1, (rows,), generator=generator)
    ends[0] = length  # one row runs to the end
    mask = (torch.arange(length)[None, :] < ends[:, None]).float()
    return ids, mask


def _relative_gap(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest gradient difference relative to the largest gradient (float32 rounding
    through a few layers is ~1e-7 of the gradients' size)."""
    gap = max((got[n] - expected[n]).abs().max().item() for n in got)
    return gap / max(expected[n].abs().max().item() for n in expected)


def _scores_and_grads(
    model: Any, batch: PromptBatch, ids: torch.Tensor, mask: torch.Tensor, group: int, **kw: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(6))

    def run() -> torch.Tensor:
        return completion_logprobs(model, batch, ids, mask, group_size=group, **kw)

    with torch.no_grad():
        scores = run()
    return scores, _loss_grads(model, run, weights)


def _repeated_cache_hidden(
    base: Any, batch: PromptBatch, completion_ids: torch.Tensor, group: int
) -> torch.Tensor:
    """The scoring forward before the prompt was shared: one prefill per prompt, its KV cache
    repeated G times, the completions run over it with the model's own attention."""
    positions, next_position = prompt_positions(base, batch)
    last_hidden, cache = prefill_prompts(base, batch, positions)
    cache.batch_repeat_interleave(group)
    steps = completion_ids.shape[1] - 1
    prompt_mask = batch.attention_mask.repeat_interleave(group, 0)
    body = model_body(base)
    out = body(
        input_ids=completion_ids[:, :-1],
        attention_mask=torch.cat([prompt_mask, prompt_mask.new_ones(len(prompt_mask), steps)], 1),
        position_ids=step_positions(next_position.repeat_interleave(group), steps, positions),
        **cache_kwargs(body, cache),
        use_cache=True,
    )
    first = last_hidden.repeat_interleave(group, 0).unsqueeze(1)
    return torch.cat([first, out.last_hidden_state], 1)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_scoring_equals_the_repeated_prompt_path(
    setup: Setup, lora: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One copy of each prompt per group gives the log-probs and gradients of the same forward
    over a prompt cache repeated G times (float32, to rounding), with left-padded prompts of
    different lengths, G 3 and completions of different lengths; and both agree with a full
    forward that repeats the prompt per completion (`shared_prefix=False`)."""
    model = setup.model
    if lora:
        torch.manual_seed(0)  # peft draws A from the global generator
        model = apply_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():  # peft starts with B = 0; move it off zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    group = 3
    ids, mask = _group_completions(setup, group)
    shared, shared_grads = _scores_and_grads(model, setup.batch, ids, mask, group)
    full, full_grads = _scores_and_grads(model, setup.batch, ids, mask, group, shared_prefix=False)
    monkeypatch.setattr(logprobs, "_shared_prefix_hidden", _repeated_cache_hidden)
    repeated, repeated_grads = _scores_and_grads(model, setup.batch, ids, mask, group)
    for name, other, other_grads in (
        ("the repeated prompt cache", repeated, repeated_grads),
        ("a full forward per completion", full, full_grads),
    ):
        gap = (shared - other).abs().max().item()
        assert gap <= 1e-6, f"shared-prompt log-probs differ from {name}'s by {gap:.2e}"
        assert shared_grads.keys() == other_grads.keys(), "a parameter lost its gradient"
        worst = _relative_gap(shared_grads, other_grads)
        # LoRA's gradients are small beside their rounding: the two repeated-prompt paths
        # already differ from each other by up to 1.5e-6 there
        assert worst <= (3e-6 if lora else 1e-6), (
            f"shared-prompt gradients differ from {name}'s by {worst:.2e}"
        )
    assert all(not lora or "lora_" in n for n in shared_grads)


@pytest.mark.parametrize("path_fixture", ["tiny_qwen25vl_path", "tiny_qwen3vl_path"])
def test_gradient_checkpointing_keeps_the_prompt_shared_and_the_gradients(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, path_fixture: str
) -> None:
    setup = _setup(request.getfixturevalue(path_fixture), gradient_checkpointing=True)
    assert setup.model.training
    plain = _setup(request.getfixturevalue(path_fixture))

    def repeated(*args: Any) -> None:
        raise AssertionError("the checkpointed forward repeated the prompt per completion")

    monkeypatch.setattr(logprobs, "full_sequence_hidden", repeated)
    ids, mask = _completions(setup)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))
    patches_seen: list[int] = []
    hook = setup.model.model.visual.register_forward_hook(
        lambda module, args, out: patches_seen.append(args[0].shape[0])
    )
    fast = _loss_grads(
        setup.model,
        lambda: completion_logprobs(setup.model, setup.batch, ids, mask, group_size=GROUP),
        weights,
    )
    hook.remove()
    per_prompt = int(setup.batch.model_kwargs["image_grid_thw"].prod(-1).sum())
    assert patches_seen == [per_prompt], "each image must be encoded once per prompt"
    slow = _loss_grads(
        plain.model,
        lambda: completion_logprobs(
            plain.model, plain.batch, ids, mask, group_size=GROUP, shared_prefix=False
        ),
        weights,
    )
    assert fast.keys() == slow.keys(), "a parameter lost its gradient under checkpointing"
    worst = _relative_gap(fast, slow)
    assert worst <= 1e-6, f"checkpointed shared-prompt gradients differ by {worst:.2e}"


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_each_image_is_encoded_once_per_prompt_not_per_completion(
    qwen25: Setup, shared_prefix: bool
) -> None:
    patches_seen: list[int] = []
    hook = qwen25.model.model.visual.register_forward_hook(
        lambda module, args, out: patches_seen.append(args[0].shape[0])
    )
    ids, mask = _completions(qwen25)
    with torch.no_grad():
        completion_logprobs(
            qwen25.model, qwen25.batch, ids, mask, group_size=GROUP, shared_prefix=shared_prefix
        )
    hook.remove()
    per_prompt = int(qwen25.batch.model_kwargs["image_grid_thw"].prod(-1).sum())
    # the naive baseline re-encodes every image once per completion: GROUP times the patches
    expected = per_prompt if shared_prefix else GROUP * per_prompt
    assert patches_seen == [expected], f"vision tower saw {patches_seen}, expected [{expected}]"


def test_chunked_recomputed_lm_head_gives_the_same_logprobs_and_gradients(
    qwen25: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, mask = _completions(qwen25)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(4))

    def run(**kwargs: Any) -> torch.Tensor:
        return completion_logprobs(
            qwen25.model, qwen25.batch, ids, mask, group_size=GROUP, **kwargs
        )

    whole, whole_grads = run().detach(), _loss_grads(qwen25.model, run, weights)
    vocab = qwen25.model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(logprobs, "HEAD_CHUNK_ELEMENTS", 3 * vocab)  # 3 tokens per chunk
    chunked = run(recompute_head=True).detach()
    assert torch.allclose(whole, chunked, atol=1e-6, rtol=0), "chunking changed the log-probs"
    grads = _loss_grads(qwen25.model, lambda: run(recompute_head=True), weights)
    worst = max((whole_grads[n] - grads[n]).abs().max().item() for n in whole_grads)
    assert worst < 1e-5, f"chunking/recomputing the LM head changed gradients by {worst:.2e}"


def test_per_token_logprobs_divide_logits_by_the_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0]])
    # t = 2: scaled logits [1, 0]; logsumexp = ln(e + 1) = 1.3132617
    # log p(0) = 1 - 1.3132617 = -0.3132617; log p(1) = 0 - 1.3132617 = -1.3132617
    got = per_token_logprobs(logits.expand(2, 2), torch.tensor([0, 1]), temperature=2.0)
    expected = torch.tensor([1 - math.log(math.e + 1), -math.log(math.e + 1)])
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), f"got {got}, expected {expected}"


def test_logprob_shapes_are_checked_with_a_clear_error(qwen25: Setup) -> None:
    ids, mask = _completions(qwen25)
    with pytest.raises(ValueError, match=r"expected \(2 prompts x 3 per group, T\)"):
        completion_logprobs(qwen25.model, qwen25.batch, ids, mask, group_size=3)


# -- sampling -------------------------------------------------------------------------------


def test_greedy_shared_prefix_decoding_matches_generate(setup: Setup) -> None:
    settings = SamplingSettings(do_sample=False, max_new_tokens=10)
    fast = setup.sample(settings)
    with torch.no_grad():
        reference = setup.model.generate(
            input_ids=setup.batch.input_ids,
            attention_mask=setup.batch.attention_mask,
            **setup.batch.model_kwargs,
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=setup.eos,
            pad_token_id=setup.pad,
            suppress_tokens=setup.suppress,
        )
    expected = rollout_from_ids(
        reference[:, setup.batch.input_ids.shape[1] :].repeat_interleave(GROUP, 0),
        tokenizer=setup.encoder.tokenizer,
        eos_token_ids=setup.eos,
        pad_token_id=setup.pad,
        max_new_tokens=10,
        group_size=GROUP,
    )
    assert torch.equal(fast.completion_ids, expected.completion_ids), (
        "greedy shared-prefix decoding disagrees with generate: positions, cache sharing or "
        f"the shared-prefix attention is off\n{fast.completion_ids}\n{expected.completion_ids}"
    )
    assert fast.texts == expected.texts


def test_decoding_with_a_repeated_prompt_cache_gives_the_same_greedy_tokens(
    qwen25: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the path for models with sliding-window layers: plain attention over a G-times cache
    shared = qwen25.sample(SamplingSettings(do_sample=False, max_new_tokens=8))
    monkeypatch.setattr(sampling, "only_full_attention", lambda base: False)
    repeated = qwen25.sample(SamplingSettings(do_sample=False, max_new_tokens=8))
    assert torch.equal(shared.completion_ids, repeated.completion_ids)


def test_decoding_stops_once_every_row_has_ended(qwen25: Setup) -> None:
    head = qwen25.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[qwen25.eos[0]] = 30.0  # every row samples EOS first
    hook = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        out = qwen25.sample(SamplingSettings(max_new_tokens=50))
    finally:
        hook.remove()
    assert out.completion_ids.shape == (len(qwen25.batch) * GROUP, 1), "kept decoding after EOS"
    assert out.completion_mask.tolist() == [[1.0]] * 4, "the EOS itself must be under the mask"
    assert out.texts == [""] * 4 and not out.truncated.any()


def test_naive_generate_path_returns_the_same_rollout_when_greedy(qwen25: Setup) -> None:
    settings = SamplingSettings(do_sample=False, max_new_tokens=8)
    fast, naive = qwen25.sample(settings), qwen25.sample(settings, shared_prefix=False)
    assert torch.equal(fast.completion_ids, naive.completion_ids)
    assert torch.equal(fast.completion_mask, naive.completion_mask)
    assert fast.texts == naive.texts and torch.equal(fast.truncated, naive.truncated)


def test_sampling_is_reproducible_with_a_seeded_generator(qwen25: Setup) -> None:
    settings = SamplingSettings(max_new_tokens=8)
    first = qwen25.sample(settings, generator=torch.Generator().manual_seed(7))
    again = qwen25.sample(settings, generator=torch.Generator().manual_seed(7))
    other = qwen25.sample(settings, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.completion_ids, again.completion_ids), "same seed, other tokens"
    assert not torch.equal(first.completion_ids, other.completion_ids), "the seed is ignored"


def test_completions_of_one_group_differ_at_temperature_one(qwen25: Setup) -> None:
    out = qwen25.sample(
        SamplingSettings(max_new_tokens=8), generator=torch.Generator().manual_seed(0)
    )
    ids = out.completion_ids
    for prompt in range(len(qwen25.batch)):
        group = ids[prompt * GROUP : (prompt + 1) * GROUP]
        assert not torch.equal(group[0], group[1]), (
            f"prompt {prompt}: the group's completions are identical; the G rows share noise"
        )


def test_hitting_max_new_tokens_without_eos_is_flagged_truncated(qwen25: Setup) -> None:
    out = qwen25.sample(
        SamplingSettings(max_new_tokens=5), suppress_token_ids=qwen25.suppress + qwen25.eos
    )
    assert out.completion_ids.shape == (len(qwen25.batch) * GROUP, 5)
    assert out.truncated.all(), "no EOS could be sampled, so every row is truncated"
    assert out.lengths.tolist() == [5] * 4 and (out.completion_mask == 1).all()


def test_suppressed_tokens_are_never_sampled_even_when_the_model_prefers_them(
    qwen25: Setup,
) -> None:
    favourite = qwen25.encoder.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    head = qwen25.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[favourite] = 30.0  # e^30: the model samples this token almost surely
    hook = head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        settings = SamplingSettings(max_new_tokens=6)
        free = qwen25.sample(
            settings, suppress_token_ids=(), generator=torch.Generator().manual_seed(0)
        )
        held = qwen25.sample(settings, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert (free.completion_ids == favourite).float().mean() > 0.9, "the bias hook did not work"
    assert not torch.isin(held.completion_ids, torch.tensor(qwen25.suppress)).any(), (
        "a suppressed vision token was sampled: re-scoring would then fail"
    )


def test_mask_covers_tokens_through_the_first_eos_and_texts_stop_there(qwen25: Setup) -> None:
    tokenizer = qwen25.encoder.tokenizer
    hello = tokenizer("Sure, here", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" and more", add_special_tokens=False)["input_ids"]
    eos, pad = qwen25.eos[0], qwen25.pad
    width = len(hello) + 1 + len(tail)
    rows = torch.tensor(
        [
            [*hello, eos, *tail],  # ends at the EOS
            [*hello, *tail, tail[0]],  # no EOS, full length: truncated
            [eos, *tail, *hello],
        ]
    )  # ends at once
    out = rollout_from_ids(
        rows,
        tokenizer=tokenizer,
        eos_token_ids=qwen25.eos,
        pad_token_id=pad,
        max_new_tokens=width,
        group_size=1,
    )
    assert out.lengths.tolist() == [len(hello) + 1, width, 1], "the first EOS must be counted"
    assert out.completion_mask[0].tolist() == [1.0] * (len(hello) + 1) + [0.0] * len(tail)
    assert (out.completion_ids[0, len(hello) + 1 :] == pad).all(), "ids after EOS must be pad"
    assert out.texts[0] == "Sure, here" and out.texts[2] == "", "texts must stop at the EOS"
    assert out.truncated.tolist() == [False, True, False]


# -- pure sampling helpers ------------------------------------------------------------------

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize(
    ("top_k", "top_p", "support"),
    [
        (2, 1.0, [0, 1]),
        (3, 1.0, [0, 1, 2]),
        (0, 0.7, [0, 1]),  # mass before each token: 0, 0.5, 0.8, 0.95 -> drop where >= 0.7
        (0, 0.85, [0, 1, 2]),  # 0.8 < 0.85 keeps token 2; 0.95 drops token 3
        (0, 0.4, [0]),  # the most likely token always stays
        (3, 0.7, [0, 1]),
    ],
)
def test_top_k_and_top_p_restrict_the_support(top_k: int, top_p: float, support: list[int]) -> None:
    filtered = filter_logits(PROBS.log(), top_k=top_k, top_p=top_p)
    kept = torch.isfinite(filtered[0]).nonzero().flatten().tolist()
    assert kept == support, f"top_k={top_k}, top_p={top_p} kept {kept}, expected {support}"
    settings = SamplingSettings(top_k=top_k, top_p=top_p)
    draws = choose_next_tokens(
        PROBS.log().expand(4000, 4), settings, torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == set(support), "a draw fell outside the support"
    # within the support, frequencies follow the renormalised probabilities (std <= 0.008)
    share = (draws == 0).float().mean().item()
    expected = 0.5 / PROBS[0, support].sum().item()
    assert abs(share - expected) < 0.03, f"token 0 drawn {share:.3f}, expected {expected:.3f}"


def test_exponential_draws_are_the_numbers_exponential_would_draw() -> None:
    # Two calls in a row: the fast path must also leave the generator where exponential_ does.
    fast_gen, slow_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for shape in [(32, 777), (5, 3)]:
        like = torch.empty(shape)
        fast = exponential_draws(like, fast_gen)
        slow = torch.empty(shape).exponential_(1.0, generator=slow_gen)
        assert torch.equal(fast, slow), (
            f"{shape}: the vectorised draws differ from exponential_'s: sampled tokens would "
            "change for a given seed"
        )


def test_sampled_ids_can_enter_a_gradient_pass(qwen25: Setup) -> None:
    out = qwen25.sample(SamplingSettings(max_new_tokens=3))
    assert not out.completion_ids.is_inference(), "inference-mode ids cannot be embedded with grad"
    logp = completion_logprobs(
        qwen25.model,
        qwen25.batch,
        out.completion_ids,
        out.completion_mask,
        group_size=GROUP,
    )
    logp.sum().backward()  # raises if an inference tensor was saved for backward


def test_sampling_settings_reject_impossible_values() -> None:
    with pytest.raises(ValueError, match="top_p is 0"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature is 0"):
        SamplingSettings(temperature=0.0)
    assert SamplingSettings(temperature=0.0, do_sample=False).max_new_tokens == 4096
    with pytest.raises(ValueError, match="decode is 'eager'; expected one of growing"):
        SamplingSettings(decode="eager")  # type: ignore[arg-type]


@pytest.mark.parametrize("query_len", [1, 3])
def test_shared_prefix_attention_equals_attention_over_a_repeated_prefix(query_len: int) -> None:
    torch.manual_seed(0)
    prompts, group, heads, kv_heads, dim, prompt_len, new = 2, 3, 4, 2, 8, 5, 4
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding on prompt 0
    prefix = DynamicCache()
    prefix.update(
        torch.randn(prompts, kv_heads, prompt_len, dim),
        torch.randn(prompts, kv_heads, prompt_len, dim),
        0,
    )
    cache = GroupDecodeCache(prefix, prompt_mask, group, capacity=new + query_len)
    rows = prompts * group
    cache.update(torch.randn(rows, kv_heads, new, dim), torch.randn(rows, kv_heads, new, dim), 0)
    keys, values = cache.update(
        torch.randn(rows, kv_heads, query_len, dim), torch.randn(rows, kv_heads, query_len, dim), 0
    )
    query = torch.randn(rows, heads, query_len, dim)
    module = torch.nn.Module()
    module.layer_idx = 0
    got, _ = shared_prefix_attention(
        module, query, keys, values, None, scaling=0.3, shared_prompt=cache.prompt
    )
    # reference: prompt K/V copied to every row of its group, GQA heads repeated, plain sdpa
    full_k = torch.cat([prefix.layers[0].keys.repeat_interleave(group, 0), keys], 2)
    full_v = torch.cat([prefix.layers[0].values.repeat_interleave(group, 0), values], 2)
    full_k, full_v = (t.repeat_interleave(heads // kv_heads, 1) for t in (full_k, full_v))
    seen = new + query_len
    causal = torch.arange(seen)[None, :] <= torch.arange(new, seen)[:, None]  # (q, seen)
    allowed = torch.cat(
        [
            prompt_mask.bool()
            .repeat_interleave(group, 0)[:, None, None, :]
            .expand(-1, 1, query_len, -1),
            causal.expand(rows, 1, -1, -1),
        ],
        -1,
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, full_k, full_v, attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (
        f"shared-prefix attention off by {(got - expected).abs().max():.2e}"
    )


# -- LoRA -----------------------------------------------------------------------------------


def test_lora_policy_scores_and_samples_and_disabling_adapters_gives_the_base(
    qwen25: Setup, tiny_qwen25vl_path: Any
) -> None:
    base = qwen25.model
    policy = apply_lora(load_policy(str(tiny_qwen25vl_path)), LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # peft starts with B = 0 (adapter = identity); move it off zero
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(3))
    ids, mask = _completions(qwen25)
    with torch.no_grad():
        reference = completion_logprobs(base, qwen25.batch, ids, mask, group_size=GROUP)
        with policy.disable_adapter():
            disabled = completion_logprobs(policy, qwen25.batch, ids, mask, group_size=GROUP)
    adapted = completion_logprobs(policy, qwen25.batch, ids, mask, group_size=GROUP)
    assert torch.allclose(disabled, reference, atol=1e-6, rtol=0), (
        "disable_adapter() must give the base model's log-probs (the KL reference)"
    )
    assert (adapted - reference).abs().max() > 1e-3, "the adapters had no effect on log-probs"
    adapted.sum().backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad), "gradients must reach only LoRA"
    out = sample_groups(
        policy,
        qwen25.batch,
        group_size=GROUP,
        settings=SamplingSettings(max_new_tokens=4),
        tokenizer=qwen25.encoder.tokenizer,
        eos_token_ids=qwen25.eos,
        pad_token_id=qwen25.pad,
        suppress_token_ids=qwen25.suppress,
    )
    assert out.completion_ids.shape[0] == len(qwen25.batch) * GROUP and policy.training


def test_shared_prompt_survives_fsdp2s_cast_of_forward_kwargs() -> None:
    """FSDP2's mixed-precision pre-hook rebuilds dataclasses and dicts in forward kwargs: the
    prompt's keys/values recorded during the prefill must land in the caller's object."""
    from torch.distributed.utils import _apply_to_tensors

    shared = SharedPrompt.for_prompts(torch.ones(2, 3, dtype=torch.long))
    cast = _apply_to_tensors(lambda t: t.to(torch.bfloat16), {"record_prompt": shared})
    cast["record_prompt"].record(0, torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))
    assert cast["record_prompt"] is shared and 0 in shared.keys
    assert shared.bias.dtype == torch.float32, "the padding bias must stay float32"


@pytest.mark.parametrize(("fused", "tile_elements"), [(True, 2**26), (False, 2**26), (False, 1)])
def test_shared_prefix_attention_gradients_equal_those_over_a_repeated_prefix(
    monkeypatch: pytest.MonkeyPatch, fused: bool, tile_elements: int
) -> None:
    """Forward (with and without grad) and backward give the output and gradients of plain
    attention over a prefix copied to every row; the prefix's gradient is summed over its
    group. `fused`: torch's fused CPU kernel, two blocks merged by log-sum-exp; otherwise the
    tiled path (scores recomputed per tile of queries; `tile_elements` 1: one query per tile)."""
    monkeypatch.setattr(prefix_attention, "ATTENTION_TILE_ELEMENTS", tile_elements)
    fused_calls = []
    if fused:
        kernel = prefix_attention._FLASH_CPU

        def counted(*args: Any, **kwargs: Any) -> Any:
            fused_calls.append(1)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(prefix_attention, "_FLASH_CPU", counted)
    else:
        monkeypatch.setattr(prefix_attention, "FUSED_CPU_KERNEL", False)
    torch.manual_seed(0)
    prompts, group, heads, kv_heads, dim, prompt_len, seen = 2, 3, 4, 2, 8, 5, 4
    rows = prompts * group
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding on prompt 0
    shared = SharedPrompt.for_prompts(prompt_mask)
    prefix_k, prefix_v = (
        torch.randn(prompts, kv_heads, prompt_len, dim, requires_grad=True) for _ in range(2)
    )
    shared.record(0, prefix_k, prefix_v)
    keys, values = (torch.randn(rows, kv_heads, seen, dim, requires_grad=True) for _ in range(2))
    query = torch.randn(rows, heads, seen, dim, requires_grad=True)
    module = torch.nn.Module()
    module.layer_idx = 0
    weights = torch.randn(rows, seen, heads, dim)
    got, _ = shared_prefix_attention(
        module, query, keys, values, None, scaling=0.3, shared_prompt=shared
    )
    with torch.no_grad():
        no_grad, _ = shared_prefix_attention(
            module, query, keys, values, None, scaling=0.3, shared_prompt=shared
        )
    inputs = (query, prefix_k, prefix_v, keys, values)
    got_grads = torch.autograd.grad((got * weights).sum(), inputs)
    assert len(fused_calls) == (4 if fused else 0), "the fused kernel ran where it should not"
    full_k = torch.cat([prefix_k.repeat_interleave(group, 0), keys], 2)
    full_v = torch.cat([prefix_v.repeat_interleave(group, 0), values], 2)
    full_k, full_v = (t.repeat_interleave(heads // kv_heads, 1) for t in (full_k, full_v))
    causal = torch.ones(seen, seen).tril().bool()
    allowed = torch.cat(
        [
            prompt_mask.bool()
            .repeat_interleave(group, 0)[:, None, None, :]
            .expand(-1, 1, seen, -1),
            causal.expand(rows, 1, -1, -1),
        ],
        -1,
    )
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, full_k, full_v, attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    expected_grads = torch.autograd.grad((expected * weights).sum(), inputs)
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    assert torch.allclose(no_grad, expected, atol=1e-6, rtol=0)
    for name, a, b in zip(
        ("query", "prefix keys", "prefix values", "keys", "values"),
        got_grads,
        expected_grads,
        strict=True,
    ):
        gap = (a - b).abs().max().item()
        assert gap <= 1e-5, f"{name} gradient off by {gap:.2e}"
    assert prefix_k.grad is None and got_grads[1][0, :, :2].abs().max() == 0, (
        "left-padding keys must get no gradient"
    )


# -- decode modes (SamplingSettings.decode) ------------------------------------------------


def _eos_bias_hook(setup: Setup, logit: float) -> Any:
    """Raise EOS's logit by `logit`: some sampled rows end early, others run on."""
    head = setup.model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[setup.eos[0]] = logit
    return head.register_forward_hook(lambda module, args, out: out + bias)


def _assert_same_rollout(got: sampling.Rollout, want: sampling.Rollout, what: str) -> None:
    assert torch.equal(got.completion_ids, want.completion_ids), (
        f"{what}: other tokens than the growing cache's from the same seed: the static cache's "
        f"write slot or its mask of unwritten slots is off\n{got.completion_ids}\n"
        f"{want.completion_ids}"
    )
    assert torch.equal(got.completion_mask, want.completion_mask), f"{what}: masks differ"
    assert torch.equal(got.lengths, want.lengths) and torch.equal(got.truncated, want.truncated)
    assert got.texts == want.texts


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_static_decode_gives_the_growing_caches_rollout(setup: Setup, do_sample: bool) -> None:
    growing, static = (
        setup.sample(
            SamplingSettings(do_sample=do_sample, max_new_tokens=10, decode=mode),
            generator=torch.Generator().manual_seed(3),
        )
        for mode in ("growing", "static")
    )
    _assert_same_rollout(static, growing, f"static, do_sample={do_sample}")


def test_static_decode_ends_and_pads_rows_as_the_growing_cache_does(qwen25: Setup) -> None:
    hook = _eos_bias_hook(qwen25, 4.0)
    try:
        growing, static = (
            qwen25.sample(
                SamplingSettings(max_new_tokens=12, decode=mode),
                generator=torch.Generator().manual_seed(0),
                keep_logprobs=True,
            )
            for mode in ("growing", "static")
        )
    finally:
        hook.remove()
    ended = growing.lengths < 12
    assert ended.any() and not ended.all(), "the test needs rows that end early and rows that don't"
    _assert_same_rollout(static, growing, "static with EOS")
    assert (static.completion_ids[static.completion_mask == 0] == qwen25.pad).all()
    assert torch.equal(static.sampler_logp, growing.sampler_logp), "sampler log-probs differ"


def test_static_cache_keeps_its_buffers_and_shapes_across_steps(
    qwen25: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, list[tuple[tuple[int, ...], int]]]] = []
    advance = GroupDecodeCache.advance

    def recording_advance(cache: GroupDecodeCache) -> None:
        buffers = [
            (tuple(layer.suffix_keys.shape), layer.suffix_keys.data_ptr()) for layer in cache.layers
        ]
        seen.append((int(cache.position), buffers))
        advance(cache)

    monkeypatch.setattr(GroupDecodeCache, "advance", recording_advance)
    qwen25.sample(
        SamplingSettings(max_new_tokens=9, decode="static"),
        suppress_token_ids=qwen25.suppress + qwen25.eos,  # every row runs to the limit
    )
    assert [position for position, _ in seen] == list(range(8)), "one slot per fed token"
    first = seen[0][1]
    assert all(buffers == first for _, buffers in seen), "a static cache reallocated or reshaped"
    assert {shape[-2] for shape, _ in first} == {9}, (
        "the buffer must hold max_new_tokens from the start"
    )


def test_static_decode_refuses_sliding_window_models_naming_the_fix(
    qwen25: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampling, "only_full_attention", lambda base: False)
    with pytest.raises(ValueError, match="sliding-window layers: use 'growing'"):
        qwen25.sample(SamplingSettings(max_new_tokens=4, decode="static"))


def test_compiled_decode_refuses_sharded_weights_before_compiling(qwen25: Setup) -> None:
    with pytest.raises(ValueError, match="decode 'compiled' is not supported with sharded"):
        qwen25.sample(SamplingSettings(max_new_tokens=4, decode="compiled"), sync_ranks=True)


@pytest.mark.slow
def test_compiled_decode_gives_the_growing_caches_tokens(qwen25: Setup) -> None:
    """One compile (tens of seconds on 2 cores): greedy tokens, then sampled tokens from the
    same seed, equal; the sampler's log-probs equal to float32 rounding (the compiled forward
    may fuse and reorder sums, so the logits are not bit-equal in general)."""
    hook = _eos_bias_hook(qwen25, 4.0)  # rows ending early, as in the static test
    try:
        for do_sample in (False, True):
            growing, compiled = (
                qwen25.sample(
                    SamplingSettings(do_sample=do_sample, max_new_tokens=8, decode=mode),
                    generator=torch.Generator().manual_seed(0),
                    keep_logprobs=True,
                )
                for mode in ("growing", "compiled")
            )
            _assert_same_rollout(compiled, growing, f"compiled, do_sample={do_sample}")
            torch.testing.assert_close(
                compiled.sampler_logp, growing.sampler_logp, atol=1e-5, rtol=0
            )
    finally:
        hook.remove()
