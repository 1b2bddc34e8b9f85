"""Serving (placeholder docstring)."""
