"""Task envelopes, serialization, executor and engines (to be written)."""
