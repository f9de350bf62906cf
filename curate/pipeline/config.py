"""pipeline.yaml: loading and whole-file validation before any work starts.

::

    name: finance-web
    plugins: [my_project.stages]   # optional: modules defining your own @register stages
    output: out/finance            # local path or any fsspec URL (s3://bucket/prefix, memory://x)
    runner: local                  # local (default) | ray
    workers: 2                     # processes of the local runner (default: CPU count)
    batch_size: 1000               # rows per batch through map stages
    rows_per_shard: 50000          # rows per output Parquet shard
    max_error_fraction: 0.01       # stop the run when more documents than this fail in a step
    report: true                   # write report.html next to stats.json at the end of a run
    env: [HF_TOKEN]                # variables Ray workers get from `curate run` (ray_executor.py)
    engines:                       # named LLM engines stages refer to with `engine: <name>`
      small: {kind: transformers}
    inputs:                        # named sources
      pages: {stage: read_warc, options: {paths: [crawl/*.warc.gz]}}
    stages:                        # named steps; `input` defaults to the previous step
      - {stage: extract_html}
      - {name: lid, stage: language_id, options: {languages: [en]}}
      - {name: rc, stage: reading_comprehension, input: lid}
      - {stage: generate, resources: {gpus: 1, replicas: 2}}   # overrides the stage's (stage.Resources)

String values may use ``${NAME}`` or ``${NAME:-default}`` (environment variables).
Every error names the file, the step and the key; the CLI exits with code 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from curate.pipeline.plugins import import_plugins
from curate.pipeline.refs import bind_engine_names, bind_step_refs
from curate.pipeline.stage import Resources, Stage, get_stage


class ConfigError(Exception):
    """An invalid pipeline file. ``problems`` lists (where, message) pairs."""

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        lines = [f"{path}: {where}: {msg}" if where else f"{path}: {msg}" for where, msg in problems]
        super().__init__("invalid pipeline\n  " + "\n  ".join(lines))


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    stage: str
    input: str | list[str] | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    save: bool = False  # materialise this step's output even when it is fused with the next
    resources: Resources | None = None  # overrides the stage's: gpus, cpus, memory_gb, replicas, max_retries


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "pipeline"
    output: str
    runner: Literal["local", "ray"] = "local"
    workers: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=1000, ge=1)
    rows_per_shard: int = Field(default=50_000, ge=1)
    max_error_fraction: float = Field(default=0.01, ge=0.0, le=1.0)
    report: bool = True   # write report.html next to stats.json at the end of a run
    plugins: list[str] = Field(default_factory=list)  # modules to import: your own @register stages
    env: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=list)  # environment variables Ray workers get from `curate run` (names only)
    engines: dict[str, dict[str, Any]] = Field(default_factory=dict)
    inputs: dict[str, StepSpec] = Field(default_factory=dict)
    stages: list[StepSpec] = Field(default_factory=list)


class Step:
    """A validated step: its name, stage instance, inputs and fingerprint."""

    def __init__(self, name: str, stage: Stage, inputs: list[str], save: bool, spec: StepSpec):
        self.name = name
        self.stage = stage
        self.inputs = inputs
        self.save = save
        self.spec = spec
        self.refs: list[str] = []      # steps named by `{step: NAME}` options (pipeline/refs.py)
        self.fingerprint = ""

    @property
    def kind(self) -> str:
        return self.stage.kind

    def options(self) -> dict[str, Any]:
        return self.stage.config.model_dump(mode="json")

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.stage.name}, inputs={self.inputs})"


class Pipeline:
    def __init__(self, spec: PipelineSpec, steps: dict[str, Step], path: str = "<dict>",
                 unexpanded: dict | None = None):
        self.spec = spec
        self.steps = steps  # in file order: inputs first, then stages
        self.path = path
        self.unexpanded = unexpanded   # the file's values before ``${VAR}`` expansion

    def written_spec(self) -> dict:
        """The spec as stored in ``<output>/_curate/pipeline.json``: every value that came from a
        ``${VAR}`` is written as its ``${VAR}`` text, never expanded, so that no secret passed
        through the environment reaches the output (fingerprints hash the expanded options)."""
        return _unexpand(self.spec.model_dump(mode="json"), self.unexpanded)

    @property
    def output(self) -> str:
        return self.spec.output

    def consumers(self, name: str) -> list[Step]:
        return [s for s in self.steps.values() if name in s.inputs]


def _loc(err: dict) -> str:
    return ".".join(str(p) for p in err.get("loc", ()))


def _parse_engines(raw: dict[str, Any], problems: list[tuple[str, str]]) -> tuple[dict[str, Any], set[str]]:
    """The file's named engines, each parsed once (every step naming it gets that config); an
    invalid entry is reported under ``engines.<name>``. Returns (parsed by name, invalid names)."""
    if not raw:
        return {}, set()
    from curate.engines.config import ENGINE_KINDS, parse_engine_config

    engines: dict[str, Any] = {}
    bad: set[str] = set()
    for name, value in raw.items():
        try:
            engines[name] = parse_engine_config(value)
        except (ValidationError, ValueError) as exc:
            bad.add(name)
            errors = exc.errors() if isinstance(exc, ValidationError) else [{"msg": str(exc), "loc": ()}]
            for e in errors:
                loc = tuple(e.get("loc", ()))
                if len(loc) > 1 and loc[0] in ENGINE_KINDS:   # the union's tag: not a key of the file
                    loc = loc[1:]
                key = ".".join(["engines", str(name), *map(str, loc)])
                problems.append((f"key {key!r}", e.get("msg", "invalid") if e.get("type") != "extra_forbidden"
                                 else "unknown key"))
    return engines, bad


def _did_you_mean(word: Any, choices: Any) -> str:
    """`` (did you mean 'x'?)`` for a close match among ``choices`` (difflib), else ""."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_keys(model: Any, loc: tuple) -> list[str]:
    """The keys allowed where ``loc`` (a pydantic error location) points, walking from ``model``
    through nested models, lists, dicts and optionals; [] when unknown."""
    import typing

    from pydantic import BaseModel

    def models(ann: Any) -> list[type]:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return [ann]
        return [m for a in typing.get_args(ann) for m in models(a)]

    current = [model]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        nxt = []
        for m in current:
            f = m.model_fields.get(str(part))
            if f is not None:
                nxt.extend(models(f.annotation))
        if not nxt:
            return []
        current = nxt
    return [k for m in current for k in m.model_fields]


def _fmt(err: dict, model: Any = None) -> str:
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        loc = tuple(err.get("loc", ()))
        hint = _did_you_mean(loc[-1], _model_keys(model, loc)) if model is not None and loc else ""
        return "unknown key" + hint
    if err.get("type") == "missing":
        return "required key is missing"
    if "input" in err and err.get("type") not in ("missing",):
        return f"{msg} (got {err['input']!r})"[:300]
    return msg


def load_pipeline(source: str | dict, *, overrides: dict[str, Any] | None = None, check: bool = True) -> Pipeline:
    """Read and validate a pipeline file (or dict). Raises ConfigError listing every problem.
    ``check=False`` skips what depends on this machine (input files, required modules): for reading
    back the plan of a finished run (``curate inspect``); it also leaves a ``${VAR}`` whose variable
    is not set as it is (``pipeline.json`` stores values unexpanded)."""
    path = source if isinstance(source, str) else "<dict>"
    if isinstance(source, str):
        if not os.path.exists(source):
            raise ConfigError(path, [("", "file not found")])
        try:
            with open(source, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(path, [("", f"not valid YAML: {exc}")]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(path, [("", f"not UTF-8 text: {exc}")]) from None
    else:
        raw = dict(source)
    if not isinstance(raw, dict):
        raise ConfigError(path, [("", "the file must be a mapping with keys name, output, inputs, stages")])
    raw = {**raw, **{k: v for k, v in (overrides or {}).items() if v is not None}}

    problems: list[tuple[str, str]] = []
    unexpanded = raw
    raw = _interpolate(raw, problems, (), keep_missing=not check)
    if problems:
        raise ConfigError(path, problems)
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        for e in exc.errors():
            loc = e.get("loc", ())
            if loc and loc[0] == "stages" and len(loc) > 1 and isinstance(loc[1], int):
                st = (raw.get("stages") or [])[loc[1]] if isinstance(raw.get("stages"), list) else {}
                label = (st.get("name") or st.get("stage")) if isinstance(st, dict) else None
                where = f"stage {label!r} (stages[{loc[1]}])" if label else f"stages[{loc[1]}]"
                rest = ".".join(str(p) for p in loc[2:])
                problems.append((f"{where}: key {rest!r}" if rest else where, _fmt(e, PipelineSpec)))
            elif loc and loc[0] == "inputs" and len(loc) > 1:
                rest = ".".join(str(p) for p in loc[2:])
                problems.append((f"input {loc[1]!r}: key {rest!r}" if rest else f"input {loc[1]!r}",
                                 _fmt(e, PipelineSpec)))
            else:
                problems.append((f"key {_loc(e)!r}", _fmt(e, PipelineSpec)))
        raise ConfigError(path, problems) from None

    for mod, reason in import_plugins(spec.plugins, source if isinstance(source, str) else None):
        problems.append(("key 'plugins'", f"cannot import {mod!r}: {reason}"))
    if not spec.inputs and not spec.stages:
        problems.append(("", "the pipeline has no inputs and no stages"))

    engines, bad_engines = _parse_engines(spec.engines, problems)

    steps: dict[str, Step] = {}
    entries: list[tuple[str, str, StepSpec, bool]] = []
    for name, s in spec.inputs.items():
        entries.append((name, f"input {name!r}", s, True))
    for i, s in enumerate(spec.stages):
        name = s.name or s.stage
        entries.append((name, f"stage {name!r} (stages[{i}])", s, False))

    seen: set[str] = set()   # every step name declared so far, valid or not
    previous: str | None = None
    only_input = next(iter(spec.inputs)) if len(spec.inputs) == 1 else None
    for name, where, s, is_input in entries:
        if name in seen:
            problems.append((where, f"step name {name!r} is used twice; give one of them `name:`"))
            continue
        seen.add(name)
        # every check of a step runs, so that one bad key does not hide the others
        try:
            cls: type[Stage] | None = get_stage(s.stage)
        except KeyError as exc:
            from curate.pipeline.stage import REGISTRY
            problems.append((f"{where}: key 'stage'", str(exc.args[0]).replace(
                "; known stages", _did_you_mean(s.stage, REGISTRY) + "; known stages", 1)))
            cls = None
        inputs = _check_inputs(name, where, s, is_input, cls, previous, only_input, entries, seen, problems)
        if not is_input:
            previous = name
        if cls is None:
            continue
        for missing in (cls.missing_requirements() if check else []):
            problems.append((where, f"stage {s.stage!r} needs a module that cannot be imported: {missing} "
                             "(reinstall curate so that its dependencies are complete)"))
        options = dict(s.options)
        if isinstance(options.get("engine"), str) and options["engine"] in bad_engines:
            continue    # its `engines:` entry is invalid: reported once, under `engines.<name>`
        # `engine: NAME`: the named engine's parsed config (see pipeline/refs.py)
        options, engine_problems = bind_engine_names(options, engines)
        if engine_problems:
            problems.extend((f"{where}: key 'options.{key}'", msg) for key, msg in engine_problems)
            continue
        try:
            stage = cls(options)
        except ValidationError as exc:
            for e in exc.errors():
                problems.append((f"{where}: key 'options.{_loc(e)}'", _fmt(e, cls.Config)))
            continue
        stage.step_name = name
        stage.resources = stage.resources.override(s.resources)
        # `{step: NAME}` option values: the output folder of an earlier step (see pipeline/refs.py)
        refs, ref_problems = bind_step_refs(stage.config, spec.output, seen - {name},
                                            {e[0] for e in entries})
        problems.extend((f"{where}: key 'options.{key}'", msg) for key, msg in ref_problems)
        for key, msg in (stage.check() if check else []):
            problems.append((f"{where}: key 'options.{key}'" if key else where, msg))
        if check and hasattr(stage, "check_upstream"):   # e.g. select's `where` against known columns
            for key, msg in stage.check_upstream(steps, inputs):
                problems.append((f"{where}: key 'options.{key}'", msg))
        steps[name] = Step(name, stage, inputs, s.save, s)
        steps[name].refs = refs
        for ref in refs:          # a referenced step is written out, whatever reads it
            if ref in steps:
                steps[ref].save = True

    if problems:
        raise ConfigError(path, problems)
    pipe = Pipeline(spec, steps, path, unexpanded)
    _fingerprint(pipe)
    return pipe


def _check_inputs(name: str, where: str, s: StepSpec, is_input: bool, cls: "type[Stage] | None",
                  previous: str | None, only_input: str | None, entries: list, seen: set[str],
                  problems: list[tuple[str, str]]) -> list[str]:
    """The step's input names; problems with them (and with where the step is listed) are added
    to ``problems``. ``cls`` is None when the stage itself is unknown."""
    kind = cls.kind if cls is not None else ("source" if is_input else "")
    if is_input or kind == "source":
        if not is_input:
            problems.append((where, f"{s.stage} is a source stage; list it under `inputs:`"))
        if s.input is not None:
            problems.append((f"{where}: key 'input'", "a source takes no input"))
        return []
    if is_input:
        problems.append((where, f"{s.stage} is not a source stage; list it under `stages:`"))
    if s.input is None:
        default = only_input if previous is None else previous
        inputs = [default] if default else []
        if not inputs:
            problems.append((f"{where}: key 'input'", "no input: name a step or define `inputs:`"))
    else:
        inputs = [s.input] if isinstance(s.input, str) else list(s.input)
        names = [e[0] for e in entries]
        for inp in inputs:
            if inp not in names:
                problems.append((f"{where}: key 'input'", f"unknown step {inp!r}"))
            elif inp not in seen or inp == name:
                problems.append((f"{where}: key 'input'", f"step {inp!r} comes later; inputs must come first"))
    if kind == "map" and len(inputs) > 1:
        problems.append((f"{where}: key 'input'", f"{s.stage} is a map stage and takes one input"))
    return inputs


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(value: Any, problems: list[tuple[str, str]], where: tuple, keep_missing: bool = False) -> Any:
    """Expand ``${NAME}`` and ``${NAME:-default}`` from the environment in every string value."""
    if isinstance(value, dict):
        return {k: _interpolate(v, problems, where + (k,), keep_missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, problems, where + (i,), keep_missing) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        if keep_missing:
            return m.group(0)
        problems.append((f"key {'.'.join(map(str, where))!r}",
                         f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"))
        return ""

    return _VAR.sub(sub, value)


def _unexpand(dumped: Any, raw: Any) -> Any:
    """``dumped`` (a validated spec as JSON) with every value that was a ``${VAR}`` string in
    ``raw`` (the file before expansion) put back as that string; the structure of the two is the
    same wherever ``raw`` has a value."""
    if isinstance(raw, str):
        return raw if _VAR.search(raw) else dumped
    if isinstance(raw, dict) and isinstance(dumped, dict):
        return {k: (_unexpand(v, raw[k]) if k in raw else v) for k, v in dumped.items()}
    if isinstance(raw, list) and isinstance(dumped, list) and len(raw) == len(dumped):
        return [_unexpand(d, r) for d, r in zip(dumped, raw)]
    return dumped


def _fingerprint(pipe: Pipeline) -> None:
    """A step's fingerprint covers its stage, options and everything upstream: a change anywhere
    above a step invalidates its finished shards on the next run. Options are hashed with their
    ``${VAR}`` values expanded (a changed variable recomputes), and only the first 16 hex digits
    of a sha256 over all options are kept, so the fingerprint does not reveal a secret's value."""
    for step in pipe.steps.values():
        h = hashlib.sha256()
        h.update(json.dumps({"stage": step.stage.name, "options": step.options(),
                             "fingerprint_extra": step.stage.fingerprint_extra()},
                            sort_keys=True, default=str).encode())
        for inp in step.inputs + step.refs:
            h.update(pipe.steps[inp].fingerprint.encode())
        step.fingerprint = h.hexdigest()[:16]
