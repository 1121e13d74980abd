"""fatq calibration stage (see docs in the README)."""
