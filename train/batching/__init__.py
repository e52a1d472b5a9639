"""Batching: which examples each process trains on at each step, the batch layouts and their collation."""
