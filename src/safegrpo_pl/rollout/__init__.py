"""Rollouts: group sampling with a shared prompt prefix, chunked for memory, and completion log-probs."""
