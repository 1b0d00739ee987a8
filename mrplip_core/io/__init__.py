"""Artifact input/output: atomic writes and human-readable inspection."""
