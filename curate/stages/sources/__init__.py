"""Stages of the sources family."""
