"""Stages of the clean family."""
