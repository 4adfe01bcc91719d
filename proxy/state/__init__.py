"""Shared request-path state: embedded in memory by default, Redis when configured."""
