"""Authorization on Casbin (to be written)."""
