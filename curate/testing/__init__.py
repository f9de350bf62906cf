"""Test-data generators shared by curate's tests and benchmarks (no downloads: built from text
that ships with Python)."""
