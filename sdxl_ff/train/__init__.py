"""The run (one owner, built once), the step, the learning-rate schedule, stability guards, divergence,
TensorBoard."""
