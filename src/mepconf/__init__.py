"""The mep conformance runner (to be written)."""
