"""Planning: which steps are materialised, and how map steps fuse into segments.

Consecutive map stages are fused into a *segment*: each task (a source task, or a slice of a
materialised step's shard) streams Arrow batches through every stage of the chain and writes
``<output>/<step>/part-<task>-<n>.parquet`` for the segment's last step only. A step is
materialised (gets a folder of its own) when it is a global stage, a source or step read by more
than one step or by a global stage, a leaf, or marked ``save: true``. A fused step's rows live in
the folder of the step that ends its chain (``Segment.target``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from curate.pipeline.config import Pipeline, Step


@dataclass
class Segment:
    target: Step                      # the materialised step
    source: Step | None               # a source step fused at the head, or None
    head: Step | None                 # a materialised step read as input, or None
    chain: list[Step] = field(default_factory=list)

    @property
    def step_names(self) -> list[str]:
        """Every step this segment runs, in order (the fused source first)."""
        return ([self.source.name] if self.source else []) + [s.name for s in self.chain]


def materialised(pipe: Pipeline) -> set[str]:
    mat: set[str] = set()
    for s in pipe.steps.values():
        cons = pipe.consumers(s.name)
        if (s.kind == "global" or s.save or not cons or len(cons) > 1
                or any(c.kind == "global" for c in cons)):
            mat.add(s.name)
    return mat


def plan(pipe: Pipeline) -> list[Segment | Step]:
    """Materialised steps in run order: Segments (source/map chains) and global Steps."""
    steps = pipe.steps
    mat = materialised(pipe)
    order: list[Segment | Step] = []
    for s in steps.values():  # file order is a topological order (inputs must come first)
        if s.name not in mat:
            continue
        if s.kind == "global":
            order.append(s)
            continue
        chain: list[Step] = []
        cur = s
        while cur.kind == "map":
            chain.insert(0, cur)
            prev = steps[cur.inputs[0]]
            if prev.name in mat or prev.kind != "map":
                break
            cur = prev
        first_in = steps[chain[0].inputs[0]] if chain else None
        if not chain:                            # a materialised source
            order.append(Segment(target=s, source=s, head=None))
        elif first_in.kind == "source" and first_in.name not in mat:
            order.append(Segment(target=s, source=first_in, head=None, chain=chain))
        else:
            order.append(Segment(target=s, source=None, head=first_in, chain=chain))
    return order

