"""User variables, sandboxed template rendering, endpoint config (to be written)."""
