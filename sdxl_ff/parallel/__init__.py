"""The one parallelism strategy (one process, DDP, FSDP2), chosen once; the launch and the Accelerator, FSDP2
sharding and its checkpoints."""
