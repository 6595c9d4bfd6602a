"""Training: the LightningModule, its optimiser step, warm-up, metrics, checkpoints and FSDP2."""
