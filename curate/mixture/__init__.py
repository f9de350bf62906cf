"""Choosing a training mixture from small runs (``curate plan-mixture``)."""
