"""Stages of the synth family."""
