"""Frozen wrappers of the standard encoders and decoders."""
