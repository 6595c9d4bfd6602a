"""Evaluation beside training: the paper's safety benchmarks in their published layouts,
pluggable judges, and one run that puts the base and the tuned model side by side.

`python -m safegrpo_pl evaluate --config configs/eval.yaml` (see `safegrpo_pl.eval.cli`).
This package imports the training package's pieces (model loading, prompt encoding, sampling,
the reward's refusal rule); the training package never imports it.
"""
