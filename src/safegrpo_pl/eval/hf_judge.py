"""`hf`: a local transformers judge loaded by path.

Two kinds of model:
- `classifier`: a sequence-classification model that reads the response and names a class,
  e.g. a refusal detector (classes like REJECTION / NORMAL) or a harm classifier (SAFE /
  UNSAFE). `label_map` turns the model's class names into verdict labels; the common names are
  mapped by default.
- `generative`: a causal LM (a text guard model, or any instruction model) asked the same
  per-benchmark question as the `http` judge, greedily; its answer is parsed the same way and an
  unreadable one is `malformed`. The picture is not shown: a text model cannot see it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from safegrpo_pl.eval.judge_prompts import build_prompt, parse_verdict
from safegrpo_pl.eval.judges import Verdict
from safegrpo_pl.eval.records import EvalRecord

DEFAULT_LABEL_MAP = {
    "refusal": "refusal",
    "rejection": "refusal",
    "refused": "refusal",
    "compliance": "compliance",
    "normal": "compliance",
    "safe": "safe",
    "unsafe": "unsafe",
    "harmful": "unsafe",
    "harmless": "safe",
}


@dataclass(frozen=True)
class HFJudgeSettings:
    """A local judge model.

    Attributes:
        path: a local folder (or hub id, where the hub is reachable) with model and tokenizer.
        kind: `classifier` (sequence classification) or `generative` (causal LM).
        label_map: the model's class names (any case) -> refusal/compliance/safe/unsafe, on top
            of the common names (REJECTION, NORMAL, SAFE, UNSAFE, ...).
        batch_size: responses per forward pass.
        max_new_tokens: answer length of a generative judge.
        max_length: input tokens kept (the end of long inputs is cut).
        device: "cpu", "cuda", ...; None picks cuda when available.
    """

    path: str
    kind: Literal["classifier", "generative"] = "classifier"
    label_map: dict[str, str] = field(default_factory=dict)
    batch_size: int = 8
    max_new_tokens: int = 64
    max_length: int = 2048
    device: str | None = None


class HFJudge:
    """The `hf` judge (see the module docstring)."""

    comparable = True

    def __init__(self, settings: HFJudgeSettings) -> None:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        if settings.kind not in ("classifier", "generative"):
            raise ValueError(
                f"hf judge kind is {settings.kind!r}; expected classifier or generative"
            )
        self.settings = settings
        self.name = f"hf:{settings.path}"
        self.device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(settings.path)
        auto = (
            AutoModelForSequenceClassification
            if settings.kind == "classifier"
            else AutoModelForCausalLM
        )
        self.model = auto.from_pretrained(settings.path).to(self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.label_map = {
            **DEFAULT_LABEL_MAP,
            **{k.lower(): v for k, v in settings.label_map.items()},
        }

    def judge(self, records: Sequence[EvalRecord], responses: Sequence[str]) -> list[Verdict]:
        step = self.settings.batch_size
        run = self._classify if self.settings.kind == "classifier" else self._generate
        verdicts: list[Verdict] = []
        for start in range(0, len(records), step):
            verdicts.extend(run(records[start : start + step], responses[start : start + step]))
        return verdicts

    @torch.no_grad()
    def _classify(self, records: Sequence[EvalRecord], responses: Sequence[str]) -> list[Verdict]:
        batch = self.tokenizer(
            list(responses),
            padding=True,
            truncation=True,
            max_length=self.settings.max_length,
            return_tensors="pt",
        ).to(self.device)
        classes = self.model(**batch).logits.argmax(-1).tolist()
        names = self.model.config.id2label
        verdicts = []
        for index in classes:
            name = str(names.get(index, index))
            label = self.label_map.get(name.lower(), "malformed")
            verdicts.append(Verdict(label, self.name, name))
        return verdicts

    @torch.no_grad()
    def _generate(self, records: Sequence[EvalRecord], responses: Sequence[str]) -> list[Verdict]:
        prompts = [build_prompt(r, t) for r, t in zip(records, responses, strict=True)]
        texts = []
        for prompt in prompts:
            messages = [
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ]
            if getattr(self.tokenizer, "chat_template", None):
                texts.append(
                    self.tokenizer.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=True
                    )
                )
            else:
                texts.append(f"{prompt.system}\n\n{prompt.user}\n")
        batch = self.tokenizer(
            texts,
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=self.settings.max_length,
            return_tensors="pt",
        ).to(self.device)
        out = self.model.generate(
            **batch,
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        answers = self.tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        return [
            Verdict(parse_verdict(a, p.words), self.name, a)
            for a, p in zip(answers, prompts, strict=True)
        ]
