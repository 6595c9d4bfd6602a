"""Memory planning: per-GPU estimates of a fit config from model dimensions, and its CLI."""
