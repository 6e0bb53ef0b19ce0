"""Spawn plans, the launcher and the stop ladder (to be written)."""
