"""curate: domain corpora for continued pre-training."""

__version__ = "0.1.0"


def stage(name: str, **options):
    """A configured stage by its registered name, ready for a library call::

        import curate
        text = curate.stage("extract_html", favor_precision=True)(pages)      # a pyarrow Table
        docs = curate.stage("read_parquet", paths="data/*.parquet")()          # sources take no input

    The same as importing its class (``curate stages`` lists them) and calling ``Class(**options)``;
    options are checked as in a pipeline file (pydantic ValidationError on a bad one)."""
    from curate.pipeline.stage import get_stage

    try:
        cls = get_stage(name)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    return cls(**options)
