"""Stages of the dedup family."""
