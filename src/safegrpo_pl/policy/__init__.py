"""The policy model: loading (hub, path or tiny), LoRA, 4-bit, precision, and prompt encoding."""
