"""Several processes: the launch and the Accelerator, DDP, FSDP2 sharding and its checkpoints."""
