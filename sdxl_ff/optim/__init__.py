"""Optimizers: AdamW8bit, AdamW, Adafactor, the per-parameter and fused modes, and the EMA."""
