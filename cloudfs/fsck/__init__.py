"""Filesystem check: one method per invariant, run in order."""
