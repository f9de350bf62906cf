"""Small helpers shared by the scoring/selection stages (not a stage module: no registration)."""

from __future__ import annotations

import hashlib


def unit_hash(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) from a document id and a seed (sampling, splits, shuffles)."""
    h = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def writer_dir(writer) -> str | None:
    """The output folder of a global step (the runner's shard writer): where a step keeps its
    artifacts (model files, cards, _selection.json; names starting with '_'). None in a library call."""
    from curate.pipeline.api import to_url

    return to_url(writer.fs, writer.dir) if hasattr(writer, "fs") and hasattr(writer, "dir") else None


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
