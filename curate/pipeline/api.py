"""The stage author's API: everything a stage module needs from ``curate.pipeline``, in one place.

::

    from curate.pipeline.api import MapStage, StageConfig, register

    @register
    class Shout(MapStage):
        name = "shout"
        reads = ("text",)
        writes = {"text": pa.string()}

        def process(self, table):
            return set_column(table, "text", pc.utf8_upper(table["text"]))

The built-in stages (``curate/stages/<family>/``) import from here, and so can plugins. The rest
of ``curate.pipeline`` (config, plan, runner, worker, executors, state, stats) is the runner's side;
a stage should not need it. LLM recipes build on ``curate.llm`` (``LLMStage``), which builds on this.
"""

from __future__ import annotations

from curate.pipeline.context import RunContext
from curate.pipeline.io import (Dataset, MemoryWriter, atomic_write_bytes, expand_paths, get_fs, is_local,
                                iter_parquet, iter_part, join, list_parquet, to_url)
from curate.pipeline.library_logs import LibraryLogs
from curate.pipeline.refs import StepRef
from curate.pipeline.schema import (DOC_SCHEMA, HTML_DOC_SCHEMA, WEB_DOC_SCHEMA, batched_tables, docs_table,
                                    dumps_meta, ensure_doc_columns, make_id, seeded_rng)
from curate.pipeline.scratch import spill_join, spill_read, spill_rmtree, spill_write, spill_writer
from curate.pipeline.stage import (FileSource, FilterStage, GlobalStage, MapStage, Resources, SourceStage, Stage,
                                   StageConfig, StageError, Task, Writer, log, register)
from curate.pipeline.state import SELECTION_FILE, STEP_CARD_FILE, STEP_MODEL_FILE
from curate.pipeline.tables import is_text_type, require_column, require_text, set_column


def gpu_count() -> int:
    """The GPUs this process may use (``CUDA_VISIBLE_DEVICES`` respected)."""
    from curate.pipeline.local_executor import gpu_count as count

    return count()


__all__ = [
    # the contract (pipeline/stage.py)
    "Stage", "SourceStage", "FileSource", "MapStage", "FilterStage", "GlobalStage", "StageConfig",
    "Resources", "Task", "StageError", "Writer", "register", "log",
    # what a global stage gets (io, context) and writes to (scratch)
    "Dataset", "MemoryWriter", "RunContext", "spill_join", "spill_read", "spill_rmtree", "spill_write",
    "spill_writer",
    # files (fsspec paths and URLs)
    "atomic_write_bytes", "expand_paths", "get_fs", "is_local", "iter_parquet", "iter_part", "join",
    "list_parquet", "to_url",
    # rows and columns
    "DOC_SCHEMA", "HTML_DOC_SCHEMA", "WEB_DOC_SCHEMA", "batched_tables", "docs_table", "dumps_meta",
    "ensure_doc_columns", "make_id", "seeded_rng", "is_text_type", "require_column", "require_text",
    "set_column",
    # options naming an earlier step ({step: NAME}), files a step leaves next to its shards
    "StepRef", "SELECTION_FILE", "STEP_CARD_FILE", "STEP_MODEL_FILE",
    # libraries' log lines, resources
    "LibraryLogs", "gpu_count",
]
