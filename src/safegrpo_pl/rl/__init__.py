"""GRPO math as pure tensor functions, and what the ranks of a multi-process run agree on."""
