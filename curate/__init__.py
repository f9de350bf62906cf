"""curate: domain corpora for continued pre-training."""

__version__ = "0.1.0"
