"""Stages of the score family."""
