"""Looking inside the training forward pass: x_t, the x0 estimate, the loss and attention maps."""
