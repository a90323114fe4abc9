"""Checkpoint tools: build the tiny demo checkpoint, download official ones, verify a directory."""
