"""Data: record sources, the LightningDataModule, the resumable training loader, rank padding."""
