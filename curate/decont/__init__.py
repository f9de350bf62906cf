"""Benchmark decontamination: normalised n-gram hashes of eval items, a shared on-disk index."""
