"""What a step learns: noise, timesteps, targets, loss types and weightings, and the forward pass that gives prediction
and target."""
