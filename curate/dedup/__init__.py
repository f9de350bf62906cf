"""Deduplication kernels (MinHash signatures, LSH band keys, connected components)."""
