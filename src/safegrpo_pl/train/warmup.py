"""The format warm-up: a short supervised stage that teaches a random-weight model the format.

A random-weight tiny model cannot write `<visual_safe>…</answer>`, so every rule reward would be
0 and GRPO would have no differences between completions to learn from. The warm-up trains the
model (all weights, cross-entropy on the response tokens only, the closing `<|im_end|>`
included) on the TRAIN records' prompts with target responses in the SafeGRPO format whose
content is deliberately uninformative:

- every tag value (visual, text, combined) is drawn at random, independently of the record's
  labels, afresh each time a record is seen;
- the answer is a refusal or a helpful reply drawn at random, independently of the tags.

So the warmed-up model writes the format but is no better than chance at the safety judgement,
and its answers do not even follow its own combined tag: everything GRPO then gains (reading
the image and the text, refusing exactly when the pair is unsafe) comes from the rule reward.

`warmed_up_path` runs the stage once and caches the result under
`safegrpo_pl.core.files.default_cache_dir() / "warmup"`, keyed by the model, the settings and the
training set, so `fit`, `validate`, `test` and `predict` on the same config all load the same
warmed-up model (the "initial policy" and GRPO's reference).

Departures (this stage is not in the paper: the authors start from an instruction-tuned Qwen-VL
that already follows the format from the prompt):
- The thinking is one line, not the paper's paragraphs: the three random tags, no summary, and
  a short canned answer (`prompts.REFUSAL_ANSWERS` / `prompts.HELPFUL_ANSWERS`): few tokens to
  sample per step. `describe_inputs=True` opens it with step 1, a description of the inputs
  (the record's `caption`, then the request repeated): content, never a safety judgement. Off
  by default: on the tiny demo model it made the warm-up harder (copying is slow to learn) and
  the GRPO runs no better.
- The log-probs come from `logprobs.completion_logprobs`, the same code path GRPO trains through,
  so the warm-up and GRPO see exactly the same positions and image features.
- Under DDP every process runs the same deterministic warm-up; the first to finish publishes
  the folder (atomic rename) and the others' identical results are discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from safegrpo_pl.core.files import TRAINED_MARKER, atomic_folder, default_cache_dir
from safegrpo_pl.core.prompts import HELPFUL_ANSWERS, REFUSAL_ANSWERS, format_response
from safegrpo_pl.core.records import SafetyRecord
from safegrpo_pl.policy.inputs import PromptBatch, PromptEncoder
from safegrpo_pl.policy.model import is_vision_parameter

log = logging.getLogger(__name__)

WARMUP_VERSION = 2  # bump when the stage's output changes for the same settings
DONE_FILE = "warmup.json"  # written last into the folder: its presence means "complete"
EOS_TOKEN = "<|im_end|>"


@dataclass(frozen=True)
class WarmupSettings:
    """Settings of the supervised format warm-up (defaults suit the tiny demo model).

    Attributes:
        steps: optimiser steps; enough to learn the format, too few to matter otherwise (the
            targets carry no information about the labels anyway).
        lr: AdamW learning rate (constant); a random-weight model needs a large one.
        batch_size: records per step, drawn at random from the train split.
        seed: seeds the record draws, the random tags and answers, and the training.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping threshold.
        unsafe_prob: probability that each target tag reads "unsafe" (0.5: pure chance).
        refusal_prob: probability that the target answer is a refusal, drawn independently of
            the tags (0.5: the answer says nothing about the judgement either).
        open_think: start responses with `<think>`; False for thinking models whose chat
            template already ends the prompt with it.
        answer_choices: how many of the canned refusals and helpful replies the targets use
            (1: one of each). Fewer variants leave fewer random tokens for GRPO to push around:
            which canned wording the policy picks earns no reward, only noise.
        describe_inputs: open the thinking with the record's caption and the request
            repeated (content only: the tags stay random).
        train_vision: train the vision tower too. Off by default: the random targets carry
            nothing about the image, so its gradients are noise, and on the demo model 150
            such steps grew the visual tokens eightfold in a direction every image shares,
            burying what tells one rendered phrase from another (measured by
            `scripts/probe_typographic.py --spread`).
        progress_bar: show a tqdm progress bar while training.
    """

    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    unsafe_prob: float = 0.5
    refusal_prob: float = 0.5
    open_think: bool = True
    answer_choices: int = 1
    describe_inputs: bool = False
    train_vision: bool = False
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"WarmupSettings: steps={self.steps}, batch_size={self.batch_size}; both must "
                "be at least 1 (set model.warmup to null to skip the warm-up)"
            )
        if not 1 <= self.answer_choices <= min(len(REFUSAL_ANSWERS), len(HELPFUL_ANSWERS)):
            raise ValueError(
                f"WarmupSettings.answer_choices is {self.answer_choices}; expected 1 to "
                f"{min(len(REFUSAL_ANSWERS), len(HELPFUL_ANSWERS))}"
            )
        if not self.lr > 0:
            raise ValueError(f"WarmupSettings.lr is {self.lr}; expected > 0")
        for name in ("unsafe_prob", "refusal_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WarmupSettings.{name} is {value}; expected a probability")

    def canned_answers(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(refusals, helpful replies) the targets draw their answer from."""
        return REFUSAL_ANSWERS[: self.answer_choices], HELPFUL_ANSWERS[: self.answer_choices]

    def cache_fields(self) -> dict[str, Any]:
        """What changes the trained weights: the settings (not the progress bar) and the texts
        of the canned answers they pick (new answer texts are new targets)."""
        fields = asdict(self)
        fields.pop("progress_bar")
        fields["canned_answers"] = self.canned_answers()
        return fields


# -- targets (pure) ---------------------------------------------------------------------------


def describe_inputs(record: SafetyRecord) -> str:
    """Step 1 of a warm-up response: what the image shows (if known) and what is asked."""
    request = " ".join(record.prompt.split())
    return " ".join(part for part in (record.caption.strip(), f"Request: {request}") if part)


def random_target(
    rng: random.Random, settings: WarmupSettings, record: SafetyRecord | None = None
) -> str:
    """One uninformative response in the SafeGRPO format: random tags, a random answer.

    Args:
        rng: the source of randomness (the caller seeds it).
        settings: tag and refusal probabilities, whether to open with `<think>`.
        record: the record answered; with `settings.describe_inputs`, its description opens
            the thinking.

    Returns:
        The response text (without the closing `<|im_end|>`).
    """
    tags = ["unsafe" if rng.random() < settings.unsafe_prob else "safe" for _ in range(3)]
    refuse = rng.random() < settings.refusal_prob
    refusals, helpful = settings.canned_answers()
    answer = rng.choice(refusals if refuse else helpful)
    caption = describe_inputs(record) if record is not None and settings.describe_inputs else ""
    return format_response(
        visual=tags[0],
        text=tags[1],
        combined=tags[2],
        answer=answer,
        caption=caption,
        open_think=settings.open_think,
    )


def encode_targets(
    tokenizer: Any, texts: Sequence[str], pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """Tokenise responses with the closing `<|im_end|>`, right-padded.

    Returns:
        ids (N, T) long, right-padded with `pad_token_id`; mask (N, T) float, 1 on real tokens.
    """
    rows = [tokenizer(text + EOS_TOKEN, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1.0
    return ids, mask


# -- the cache key ----------------------------------------------------------------------


def _model_identity(model_path: str) -> str:
    """The path, plus the content of its config.json (a rebuilt tiny model changes it)."""
    config = Path(model_path) / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else ""
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    sizes = [(w.name, w.stat().st_size, int(w.stat().st_mtime)) for w in weights]
    return json.dumps([str(model_path), digest, sizes])


def warmup_cache_key(model_path: str, settings: WarmupSettings, identity: dict[str, Any]) -> str:
    """16 hex digits of a hash of (model, settings and their canned answers, training set,
    stage version)."""
    payload = json.dumps(
        [_model_identity(model_path), settings.cache_fields(), identity, WARMUP_VERSION],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def already_warmed_up(model_path: str) -> str | None:
    """Why `model_path` must not be warmed up again, or None when it may be.

    A folder that the warm-up wrote (it holds `warmup.json`) or that a fit exported (it holds
    `files.TRAINED_MARKER`) is past this stage: warming it up again would overwrite what
    training taught it with random-tag targets.
    """
    folder = Path(model_path)
    if (folder / TRAINED_MARKER).is_file():
        return f"{model_path} is a model exported by a SafeGRPO fit (it holds {TRAINED_MARKER})"
    if (folder / DONE_FILE).is_file():
        return f"{model_path} is the output of a format warm-up (it holds {DONE_FILE})"
    return None


# -- training -------------------------------------------------------------------------------


def warmup_loss(model: Any, batch: PromptBatch, target_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Mean cross-entropy of the target response tokens (EOS included) given their prompts.

    Args:
        model: the policy being warmed up.
        batch: B prompts.
        target_ids: (B, T) response ids, right-padded.
        target_mask: (B, T) 1 on response tokens, 0 on padding.

    Returns:
        A 0-dim loss: token-mean of -log p over the mask.
    """
    from safegrpo_pl.rollout.logprobs import completion_logprobs

    logp = completion_logprobs(model, batch, target_ids, target_mask, group_size=1)  # (B, T)
    return -(logp * target_mask).sum() / target_mask.sum().clamp(min=1.0)


def train_warmup(
    model: Any,
    encoder: PromptEncoder,
    records: Sequence[SafetyRecord],
    settings: WarmupSettings,
) -> list[float]:
    """Run the warm-up on `model` in place; returns the loss of every step.

    Args:
        model: a loaded policy (all weights trainable).
        encoder: builds the prompts (chat template, guide, image tokens).
        records: the train records (indexable; images decoded on access).
        settings: steps, batch size, learning rate, seed, target probabilities.
    """
    # Its own random stream: a run must sample the same whether its warm-up was trained now
    # or read from the cache, so the warm-up leaves the global state as it found it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return _train_warmup(model, encoder, records, settings)


def _train_warmup(
    model: Any, encoder: PromptEncoder, records: Sequence[SafetyRecord], settings: WarmupSettings
) -> list[float]:
    rng = random.Random(f"safegrpo-warmup/{settings.seed}")
    pad = encoder.tokenizer.pad_token_id
    pad_id = int(pad if pad is not None else encoder.tokenizer.convert_tokens_to_ids(EOS_TOKEN))
    params = [
        p
        for name, p in model.named_parameters()
        if p.requires_grad and (settings.train_vision or not is_vision_parameter(name))
    ]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses: list[float] = []
    bar = tqdm(
        range(settings.steps),
        desc="format warm-up",
        disable=not settings.progress_bar,
        dynamic_ncols=True,
    )
    for _ in bar:
        picks = [rng.randrange(len(records)) for _ in range(settings.batch_size)]
        batch = encoder.encode([records[i] for i in picks])
        ids, mask = encode_targets(
            encoder.tokenizer, [random_target(rng, settings, records[i]) for i in picks], pad_id
        )
        loss = warmup_loss(model, batch, ids, mask)
        model.zero_grad(set_to_none=True)  # frozen parameters' gradients too
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.zero_grad(set_to_none=True)  # the saved model carries no gradients
    return losses


def warmed_up_path(
    model_path: str,
    settings: WarmupSettings,
    *,
    records: Sequence[SafetyRecord],
    encoder: PromptEncoder,
    dataset_key: dict[str, Any],
) -> str:
    """The folder of `model_path` after the format warm-up, training it on first use.

    Args:
        model_path: a local model folder (a resolved `tiny:` path, or a downloaded checkpoint).
        settings: the warm-up settings.
        records: the train records it learns from (indexable; images decoded on access).
        encoder: builds the prompts (the datamodule's, so the guide and template match).
        dataset_key: what identifies the training set in the cache key
            (`SafeTagDataModule.warmup_key()`): another data set trains another warm-up.

    Returns:
        A folder with the warmed-up model, its tokenizer and image processor, loadable by
        `load_policy` / `PromptEncoder.from_pretrained` like any checkpoint.
    """
    from safegrpo_pl.policy.model import load_policy

    if len(records) == 0:
        raise ValueError("the format warm-up got no train records")
    train = records
    key = warmup_cache_key(model_path, settings, dataset_key)
    target = default_cache_dir() / "warmup" / f"{Path(model_path).name}-{key}"
    if (target / DONE_FILE).exists():
        log.info(
            "format warm-up: reusing the cached result in %s (built earlier for the same "
            "model, settings and data; delete it to train it again)",
            target,
        )
        return str(target)
    model = load_policy(model_path)  # full weights, float32, train mode
    log.info(
        "format warm-up: %d steps of %d records on %s",
        settings.steps,
        settings.batch_size,
        model_path,
    )
    losses = train_warmup(model, encoder, train, settings)
    # Another process may publish the same warm-up first; then ours is dropped.
    with atomic_folder(target, replace=False, complete_marker=DONE_FILE) as tmp:
        model.save_pretrained(tmp)
        encoder.tokenizer.save_pretrained(tmp)
        if encoder.image_processor is not None:
            encoder.image_processor.save_pretrained(tmp)
        record = {
            "model_path": str(model_path),
            "settings": asdict(settings),
            "first_loss": losses[0],
            "final_loss": losses[-1],
        }
        (tmp / DONE_FILE).write_text(json.dumps(record, indent=2))
    log.info("format warm-up: loss %.3f -> %.3f, saved to %s", losses[0], losses[-1], target)
    return str(target)
