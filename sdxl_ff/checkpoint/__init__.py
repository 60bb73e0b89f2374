"""Checkpoints: numbered model folders with the trainer state, resume, the run lock, the trainer progress."""
