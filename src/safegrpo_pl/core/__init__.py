"""Pure cores: records, the completion format, rule rewards, prompts, errors and files (no torch model code)."""
