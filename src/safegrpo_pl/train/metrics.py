"""Training-time safety metrics as torchmetrics objects (docs/method.md section 5.1).

Every metric here is a share (or a mean) over the samples it is eligible for: a running sum of
per-sample values and a running count of eligible samples, both summed across batches and
across processes (`dist_reduce_fx="sum"`), so the value is exact however the data is sharded.
They are rule-based: "refused" is the keyword rule of docs/method.md section 3.3, never a judge, and these
figures are not comparable with the paper's judge-based numbers.

One set of update keywords serves every metric, so a `MetricCollection` updates them all in
one call (torchmetrics hands each metric only the keywords its `update` names):
`refused`, `combine_unsafe`, `compositional`, `format_ok`, `visual_correct`, `text_correct`,
`combined_correct` (bool, shape (N,)), `reward_total`, `reward_format`, `reward_tag`,
`reward_behavior` (float, shape (N,)) and `sources` (N strings, optional). `metric_inputs`
builds them from `RewardParts`.

Decisions worth knowing:
- **No eligible samples gives NaN**, not 0: a safety score of 0 would read as "never refuses".
  `loggable_values` drops NaN entries, so a batch without unsafe pairs logs no safety score.
- **Per-source metrics** are the same classes built with `source="vlguard"`: they count only
  the samples whose entry in `sources` equals their source, so each sample's provenance travels
  as a plain list of strings next to the tensors (no index table to keep in step).
- **Compute groups are off** in `build_safety_metrics`. torchmetrics otherwise merges metrics
  whose states happen to be equal after the first update (for example a safety score and a
  refusal rate that both saw 2 of 2) and from then on updates only one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from safegrpo_pl.core.rewards import RewardParts

REWARD_PARTS: tuple[str, ...] = ("total", "format", "tag", "behavior")
"""The parts of `RewardParts` that `MeanReward` can average."""

TAG_MODALITIES: tuple[str, ...] = ("visual", "text", "combined")
"""The three tags whose accuracy `TagAccuracy` can report."""


def _as_vector(name: str, value: Tensor | None, owner: str, dtype: torch.dtype) -> Tensor:
    """Check that an update input is a 1-D tensor and cast it; the error names the fix."""
    if value is None:
        raise ValueError(f"{owner}.update needs `{name}`; pass the dict from metric_inputs(...)")
    if not isinstance(value, Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"{owner}.update: `{name}` must be a 1-D tensor of shape (N,), got {shape}"
        )
    return value.to(dtype)


class _ShareMetric(Metric):
    """Running `sum(value over eligible samples) / count(eligible samples)`; NaN when none.

    Subclasses turn their update keywords into a per-sample value (N,) and an eligibility mask
    (N,) and call `_accumulate`.

    Args:
        source: if given, count only samples whose `sources` entry equals it.
        **kwargs: passed to `torchmetrics.Metric` (e.g. `sync_on_compute`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, source: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.source = source
        self.add_state("value_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("eligible_count", torch.tensor(0.0), dist_reduce_fx="sum")

    def _describe(self) -> str:
        name = type(self).__name__
        return name if self.source is None else f"{name}(source={self.source!r})"

    def _accumulate(self, values: Tensor, eligible: Tensor, sources: Sequence[str] | None) -> None:
        """Add one batch: `values` (N,) float, `eligible` (N,) bool, `sources` N strings."""
        if values.shape != eligible.shape:
            raise ValueError(
                f"{self._describe()}.update: inputs differ in length "
                f"({values.shape[0]} vs {eligible.shape[0]}); pass one entry per completion"
            )
        if self.source is not None:
            if sources is None or isinstance(sources, str) or len(sources) != len(values):
                got = "none" if sources is None else f"{type(sources).__name__} {sources!r:.60}"
                raise ValueError(
                    f"{self._describe()}.update needs `sources`, one str per sample "
                    f"({len(values)}), got {got}; pass sources=[record.source, ...]"
                )
            from_source = [entry == self.source for entry in sources]
            eligible = eligible & torch.tensor(from_source, dtype=torch.bool, device=values.device)
        self.value_sum += torch.where(eligible, values, 0.0).sum()
        self.eligible_count += eligible.sum()

    def compute(self) -> Tensor:
        """The share over all eligible samples seen so far; NaN if there were none."""
        return self.value_sum / self.eligible_count


class SafetyScore(_ShareMetric):
    """Share of refusals among samples whose `combine_tag` is unsafe. Higher is better."""

    def update(
        self, refused: Tensor, combine_unsafe: Tensor, sources: Sequence[str] | None = None
    ) -> None:
        """Count the refusals among this batch's unsafe pairs.

        Args:
            refused: (N,) bool, the response refuses by the keyword rule.
            combine_unsafe: (N,) bool, the pair's label is unsafe.
            sources: N source names; needed only when the metric has a `source`.
        """
        owner = self._describe()
        refused = _as_vector("refused", refused, owner, torch.float32)
        eligible = _as_vector("combine_unsafe", combine_unsafe, owner, torch.bool)
        self._accumulate(refused, eligible, sources)


class RefusalRate(_ShareMetric):
    """Share of refusals among samples whose `combine_tag` is safe. Lower is better."""

    higher_is_better = False

    def update(
        self, refused: Tensor, combine_unsafe: Tensor, sources: Sequence[str] | None = None
    ) -> None:
        """Count the refusals among this batch's safe pairs.

        Args:
            refused: (N,) bool, the response refuses by the keyword rule.
            combine_unsafe: (N,) bool, the pair's label is unsafe (these are skipped).
            sources: N source names; needed only when the metric has a `source`.
        """
        owner = self._describe()
        refused = _as_vector("refused", refused, owner, torch.float32)
        eligible = ~_as_vector("combine_unsafe", combine_unsafe, owner, torch.bool)
        self._accumulate(refused, eligible, sources)


class CompositionalSafetyScore(_ShareMetric):
    """Share of refusals among compositional samples (image safe, text safe, pair unsafe)."""

    def update(
        self, refused: Tensor, compositional: Tensor, sources: Sequence[str] | None = None
    ) -> None:
        """Count the refusals among this batch's compositional pairs.

        Args:
            refused: (N,) bool, the response refuses by the keyword rule.
            compositional: (N,) bool, image and text safe but the pair unsafe.
            sources: N source names; needed only when the metric has a `source`.
        """
        owner = self._describe()
        refused = _as_vector("refused", refused, owner, torch.float32)
        eligible = _as_vector("compositional", compositional, owner, torch.bool)
        self._accumulate(refused, eligible, sources)


class FormatRate(_ShareMetric):
    """Share of completions that pass the format gate."""

    def update(self, format_ok: Tensor, sources: Sequence[str] | None = None) -> None:
        """Count the completions that pass the format gate.

        Args:
            format_ok: (N,) bool.
            sources: N source names; needed only when the metric has a `source`.
        """
        format_ok = _as_vector("format_ok", format_ok, self._describe(), torch.float32)
        self._accumulate(format_ok, torch.ones_like(format_ok, dtype=torch.bool), sources)


class TagAccuracy(_ShareMetric):
    """Share of completions whose first valid tag of one modality equals the label.

    Args:
        modality: "visual", "text" or "combined".
        source: if given, count only samples from this source.
        **kwargs: passed to `torchmetrics.Metric`.
    """

    def __init__(
        self, modality: str = "combined", source: str | None = None, **kwargs: Any
    ) -> None:
        if modality not in TAG_MODALITIES:
            raise ValueError(
                f"TagAccuracy modality is {modality!r}; expected one of {TAG_MODALITIES}"
            )
        super().__init__(source=source, **kwargs)
        self.modality = modality

    def update(
        self,
        visual_correct: Tensor | None = None,
        text_correct: Tensor | None = None,
        combined_correct: Tensor | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        """Count the correct tags of this metric's modality; the other two flags are ignored.

        Args:
            visual_correct: (N,) bool, needed when modality is "visual".
            text_correct: (N,) bool, needed when modality is "text".
            combined_correct: (N,) bool, needed when modality is "combined".
            sources: N source names; needed only when the metric has a `source`.
        """
        given = {"visual": visual_correct, "text": text_correct, "combined": combined_correct}
        name = f"{self.modality}_correct"
        correct = _as_vector(name, given[self.modality], self._describe(), torch.float32)
        self._accumulate(correct, torch.ones_like(correct, dtype=torch.bool), sources)


class MeanReward(_ShareMetric):
    """Mean of the total reward or of one of its parts over all completions.

    Args:
        part: "total", "format", "tag" or "behavior" (the fields of `RewardParts`).
        source: if given, average only samples from this source.
        **kwargs: passed to `torchmetrics.Metric`.
    """

    def __init__(self, part: str = "total", source: str | None = None, **kwargs: Any) -> None:
        if part not in REWARD_PARTS:
            raise ValueError(f"MeanReward part is {part!r}; expected one of {REWARD_PARTS}")
        super().__init__(source=source, **kwargs)
        self.part = part

    def update(
        self,
        reward_total: Tensor | None = None,
        reward_format: Tensor | None = None,
        reward_tag: Tensor | None = None,
        reward_behavior: Tensor | None = None,
        sources: Sequence[str] | None = None,
    ) -> None:
        """Add this metric's reward part; the other parts are ignored.

        Args:
            reward_total: (N,) float, needed when part is "total".
            reward_format: (N,) float, needed when part is "format".
            reward_tag: (N,) float, needed when part is "tag".
            reward_behavior: (N,) float, needed when part is "behavior".
            sources: N source names; needed only when the metric has a `source`.
        """
        given = {
            "total": reward_total,
            "format": reward_format,
            "tag": reward_tag,
            "behavior": reward_behavior,
        }
        name = f"reward_{self.part}"
        rewards = _as_vector(name, given[self.part], self._describe(), torch.float32)
        self._accumulate(rewards, torch.ones_like(rewards, dtype=torch.bool), sources)


def metric_inputs(
    parts: Sequence[RewardParts],
    combine_tags: Sequence[str],
    image_tags: Sequence[str],
    text_tags: Sequence[str],
    *,
    sources: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Tensor | list[str]]:
    """Turn scored completions and their labels into the update keywords of every metric.

    Args:
        parts: N scored completions (from `rewards.score_completions`).
        combine_tags: N pair labels, one per completion (repeat a record's labels G times).
        image_tags: N image labels.
        text_tags: N instruction labels.
        sources: N source names; when given, the dict also carries `sources` for the
            per-source metrics.
        device: where to put the tensors (the metrics' device).

    Returns:
        `refused`, `combine_unsafe`, `compositional`, `format_ok`, `visual_correct`,
        `text_correct`, `combined_correct` as (N,) bool tensors; `reward_total`,
        `reward_format`, `reward_tag`, `reward_behavior` as (N,) float32 tensors; and
        `sources` as a list of str when given.

    Raises:
        ValueError: if the sequences differ in length.
    """
    lengths = {
        "parts": len(parts),
        "combine_tags": len(combine_tags),
        "image_tags": len(image_tags),
        "text_tags": len(text_tags),
    }
    if sources is not None:
        lengths["sources"] = len(sources)
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"metric_inputs needs one label of each kind per scored completion; got lengths "
            f"{lengths}. With G completions per record, repeat each record's labels G times."
        )

    def flags(values: Sequence[bool]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.bool, device=device)  # (N,)

    def floats(values: Sequence[float]) -> Tensor:
        return torch.tensor(list(values), dtype=torch.float32, device=device)  # (N,)

    combine_unsafe = [tag.strip().lower() == "unsafe" for tag in combine_tags]
    image_safe = [tag.strip().lower() == "safe" for tag in image_tags]
    text_safe = [tag.strip().lower() == "safe" for tag in text_tags]
    inputs: dict[str, Tensor | list[str]] = {
        "refused": flags(p.refused for p in parts),
        "combine_unsafe": flags(combine_unsafe),
        "compositional": flags(
            i and t and c for i, t, c in zip(image_safe, text_safe, combine_unsafe, strict=True)
        ),
        "format_ok": flags(p.format > 0 for p in parts),
        "visual_correct": flags(p.visual_correct for p in parts),
        "text_correct": flags(p.text_correct for p in parts),
        "combined_correct": flags(p.combined_correct for p in parts),
        "reward_total": floats(p.total for p in parts),
        "reward_format": floats(p.format for p in parts),
        "reward_tag": floats(p.tag for p in parts),
        "reward_behavior": floats(p.behavior for p in parts),
    }
    if sources is not None:
        inputs["sources"] = list(sources)
    return inputs


def _source_key(source: str) -> str:
    """A metric-name-safe form of a source: torch module names may not contain '.'."""
    return source.replace(".", "_")


def build_safety_metrics(prefix: str, sources: Sequence[str] = ()) -> MetricCollection:
    """All training-time metrics of one stage, named `<prefix><metric>[/<source>]`.

    Overall: `safety_score`, `refusal_rate`, `compositional_safety_score`, `format_rate`,
    `visual_tag_acc`, `text_tag_acc`, `combined_tag_acc`, `reward`, `reward_format`,
    `reward_tag`, `reward_behavior`. Per source: `safety_score/<source>`,
    `refusal_rate/<source>`, `reward/<source>` (a '.' in a source name becomes '_'). Update
    with `collection.update(**metric_inputs(..., sources=...))`; make the next stage's copy with
    `collection.clone(prefix="test/")`.

    Args:
        prefix: stage namespace, e.g. "val/".
        sources: source names to split by; duplicates and empty names are skipped (samples
            without a source still count in the overall metrics).

    Raises:
        ValueError: if two sources map to the same metric name.
    """
    metrics: dict[str, Metric] = {
        "safety_score": SafetyScore(),
        "refusal_rate": RefusalRate(),
        "compositional_safety_score": CompositionalSafetyScore(),
        "format_rate": FormatRate(),
        **{f"{m}_tag_acc": TagAccuracy(m) for m in TAG_MODALITIES},
        "reward": MeanReward("total"),
        **{f"reward_{part}": MeanReward(part) for part in REWARD_PARTS if part != "total"},
    }
    seen: dict[str, str] = {}
    for source in dict.fromkeys(s for s in sources if s):
        key = _source_key(source)
        if key in seen:
            raise ValueError(
                f"sources {seen[key]!r} and {source!r} would share the metric name "
                f"'{prefix}safety_score/{key}'; rename one of them"
            )
        seen[key] = source
        metrics[f"safety_score/{key}"] = SafetyScore(source=source)
        metrics[f"refusal_rate/{key}"] = RefusalRate(source=source)
        metrics[f"reward/{key}"] = MeanReward("total", source=source)
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def loggable_values(collection: MetricCollection) -> dict[str, Tensor]:
    """`collection.compute()` without the metrics that saw no eligible sample (NaN).

    `compute` syncs across processes first, so every process drops the same names and
    `LightningModule.log_dict` sees the same keys everywhere. The caller still resets the
    collection at the end of the epoch.
    """
    return {name: value for name, value in collection.compute().items() if not value.isnan()}
