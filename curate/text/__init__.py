"""Text helpers shared by stages (normalisation for hashing, ...)."""
