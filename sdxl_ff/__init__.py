"""sdxl-ff: the reusable pieces of the SDXL full fine-tuning trainer, one module per concern."""
