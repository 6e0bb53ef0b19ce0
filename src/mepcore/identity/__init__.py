"""Identity mapping: external identities to local POSIX accounts (to be written)."""
