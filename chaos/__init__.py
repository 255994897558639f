"""Chaos tooling (issue 7)."""
