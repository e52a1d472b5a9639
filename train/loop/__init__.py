"""The training loop: the trainer, checkpoints, optimizer and schedule, throughput, progress, the model card."""
