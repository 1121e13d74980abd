"""fatq export stage (see docs in the README)."""
