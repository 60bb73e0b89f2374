"""The run: its state, the step, the learning-rate schedule, stability guards, divergence, TensorBoard."""
