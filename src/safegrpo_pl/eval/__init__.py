"""Evaluation: benchmarks in their published layouts, judges, and a base vs tuned report."""
