"""Attention backends: the registry, our own implementations, their memory model and the planner."""
