"""Stages of the select family."""
