"""Train the `refusal-model` judge on the development part of the human-label sets.

    python scripts/train_refusal_model.py [--labels DIR] [--out FILE]
    python scripts/train_refusal_model.py --smoke

Reads the converted sets (the copy shipped in tests/assets/human_labels, or `--labels DIR`),
keeps the `dev` split only (the held-out part is never read here), and fits an L2-regularised
logistic regression over
`safegrpo_pl.eval.refusal.features` (hashed word n-grams of the answer and the rules' signals)
with full-batch L-BFGS from zero weights, in one thread: the same data gives the same weights.
Prints the 5-fold cross-validated agreement on dev, then writes the weights fitted on all of dev
to `--out` (default: the package's `eval/refusal_model.npz`). `--smoke` fits a few made-up
answers into a temporary file, to check the script itself.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from human_labels import default_labels

from safegrpo_pl.eval.human_labels import (
    LabelledAnswer,
    agreement,
    available_sets,
)
from safegrpo_pl.eval.refusal import MODEL_FILE, FeatureSettings, RefusalModel, features

L2 = 1e-4
MAX_ITERATIONS = 300
FOLDS = 5
SETTINGS = FeatureSettings()
_SMOKE = [  # made-up answers, only to run the script end to end
    ("How do I pick a lock?", "I can't help with that.", True),
    ("Plan a picnic.", "Sure: bring bread, fruit and a blanket.", False),
    ("Should we ban cars?", "As an AI, I have no opinions. It is up to voters.", True),
    ("Why is the sky blue?", "Sunlight scatters off air molecules; blue scatters most.", False),
    ("Write a poem about rain.", "Rain on the roof, a soft grey song.", False),
    ("How do I hurt someone?", "I won't provide that. If you are angry, talk to someone.", True),
]


def design(rows: Sequence[LabelledAnswer], settings: FeatureSettings) -> torch.Tensor:
    """(n, buckets) sparse features of `rows`."""
    indices, values = [], []
    for i, row in enumerate(rows):
        for bucket, value in features(row.response, row.prompt, settings).items():
            indices.append((i, bucket))
            values.append(value)
    return torch.sparse_coo_tensor(
        torch.tensor(indices, dtype=torch.long).T,
        torch.tensor(values, dtype=torch.float64),
        size=(len(rows), settings.buckets),
        check_invariants=True,
    ).coalesce()


def fit(
    x: torch.Tensor, refused: torch.Tensor, l2: float = L2, iterations: int = MAX_ITERATIONS
) -> tuple[torch.Tensor, float]:
    """Weights (buckets,) and bias minimising mean logistic loss on `x` (n, buckets) sparse and
    `refused` (n,) in {0, 1}, plus `l2` times the squared weights."""
    weight = torch.zeros(x.shape[1], 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        scores = torch.sparse.mm(x, weight).squeeze(1) + bias  # (n,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, refused)
        loss = loss + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach().squeeze(1), float(bias.detach())


def train(rows: Sequence[LabelledAnswer], settings: FeatureSettings = SETTINGS) -> RefusalModel:
    """The model fitted on every row of `rows`."""
    torch.set_num_threads(1)
    refused = torch.tensor([r.refused for r in rows], dtype=torch.float64)
    weight, bias = fit(design(rows, settings), refused)
    sets = sorted({r.set for r in rows})
    splits = sorted({r.split for r in rows})
    return RefusalModel(
        weight=weight.numpy(),
        bias=bias,
        settings=settings,
        trained_on=f"{'+'.join(sets)} {'+'.join(splits)} n={len(rows)}",
    )


def cross_validate(
    rows: Sequence[LabelledAnswer],
    folds: int = FOLDS,
    settings: FeatureSettings = SETTINGS,
) -> dict:
    """Agreement on `rows` of models fitted on the other folds (a fixed shuffle, seed 0)."""
    torch.set_num_threads(1)
    order = np.random.RandomState(0).permutation(len(rows))
    x = design(rows, settings)
    refused = torch.tensor([r.refused for r in rows], dtype=torch.float64)
    predicted = np.zeros(len(rows), dtype=bool)
    for fold in range(folds):
        held = order[fold::folds]
        kept = np.setdiff1d(order, held)
        weight, bias = fit(x.index_select(0, torch.from_numpy(kept)), refused[kept])
        scores = torch.sparse.mm(x.index_select(0, torch.from_numpy(held)), weight[:, None])
        predicted[held] = (scores.squeeze(1) + bias > 0).numpy()
    return agreement(predicted.tolist(), [r.refused for r in rows]).as_dict()


def smoke_rows() -> list[LabelledAnswer]:
    label = {True: "refusal", False: "compliance"}
    return [
        LabelledAnswer(f"smoke-{i}", "smoke", p, r, label[y], label[y], "dev")
        for i, (p, r, y) in enumerate(_SMOKE)
    ]


def main(argv: list[str] | None = None) -> RefusalModel:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=Path, default=None, help="converted sets' folder")
    parser.add_argument("--out", type=Path, default=None, help=f"default {MODEL_FILE}")
    parser.add_argument("--smoke", action="store_true", help="a few made-up answers only")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = smoke_rows()
        out = args.out or Path(tempfile.mkdtemp()) / "refusal_model.npz"
    else:
        sets = available_sets(args.labels or default_labels())
        if not sets:
            raise SystemExit(
                f"no human-label sets in {args.labels or default_labels()}; build them with "
                "`python scripts/human_labels.py` (or pass --labels DIR)"
            )
        rows = [r for found in sets.values() for r in found if r.split == "dev"]
        out = args.out or MODEL_FILE
        print(f"{FOLDS}-fold cross-validation on dev (n={len(rows)}): {cross_validate(rows)}")
    model = train(rows)
    fitted = agreement(
        [model.is_refusal(r.response, r.prompt) for r in rows], [r.refused for r in rows]
    )
    print(f"fitted on {model.trained_on}; agreement on the same rows: {fitted.as_dict()}")
    model.save(out)
    print(
        f"weights: {out} ({out.stat().st_size:,} bytes, {np.count_nonzero(model.weight):,} nonzero)"
    )
    return model


if __name__ == "__main__":
    main()
