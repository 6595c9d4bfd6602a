"""SafeGRPO in PyTorch Lightning: rule-rewarded GRPO for multimodal safety alignment."""

__version__ = "0.1.0"
