"""fatq engines stage (see docs in the README)."""
