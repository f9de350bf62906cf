"""Running a pipeline from Python: ``run_pipeline``, the library equivalent of ``curate run``.

Next to ``curate.cli`` (the other entry point): both give the runner the report writer, so the
runner (``curate.pipeline``) never imports the report and the report reads only the run layout.
"""

from __future__ import annotations

from curate.pipeline.config import Pipeline
from curate.pipeline.runner import Runner, RunResult
from curate.pipeline.stats import funnel_table

__all__ = ["run_pipeline"]


def write_report(output: str) -> str:
    """report.html into a run's output (imported when a run finishes: the report pulls in numpy)."""
    from curate.report import write_report as write

    return write(output)


def run_pipeline(source: str | dict | Pipeline, *, force: bool = False, runner: str | None = None,
                 workers: int | None = None, output: str | None = None, progress: bool = True,
                 print_funnel: bool = False, break_lock: str | None = None,
                 estimate: str | dict | None = None) -> RunResult:
    """Validate and run a pipeline file/dict. The library equivalent of ``curate run``.
    ``estimate``: a ``curate estimate`` JSON (path or dict) to compare the LLM steps with
    (``RunResult.estimate``, ``stats.json``, the report)."""
    from curate.pipeline.config import load_pipeline

    pipe = source if isinstance(source, Pipeline) else load_pipeline(
        source, overrides={"runner": runner, "workers": workers, "output": output})
    if isinstance(estimate, str):
        from curate.pipeline.estimate import load_estimate

        path, estimate = estimate, load_estimate(estimate)
        if estimate is None:
            raise ValueError(f"{path}: not an estimate JSON of `curate estimate`")
        estimate["_path"] = path
    result = Runner(pipe, force=force, workers=workers, progress=progress, break_lock=break_lock,
                    estimate=estimate, report=write_report).run()
    if print_funnel:
        print(funnel_table(result.stats))
        import sys

        from curate.pipeline.stats import funnel_warnings
        if funnel_warnings(result.stats):
            print(funnel_warnings(result.stats), file=sys.stderr)
    return result
