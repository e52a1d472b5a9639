"""Objectives: the pure loss functions and the trainer subclass of each loss."""
