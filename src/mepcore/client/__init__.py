"""The scientists SDK (to be written)."""
