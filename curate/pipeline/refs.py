"""References by name in a stage's options, resolved by the pipeline loader.

Step references: an option value ``{step: NAME}`` names another step's output folder.

A stage declares an option of type ``StepRef`` (or ``str | StepRef``) when it can use what an
earlier step wrote: a model trained by ``train_classifier`` (``fasttext_score``'s
``model: {step: train}``), or documents of a step used as training data. The pipeline loader
(:func:`bind_step_refs`) checks that the named step exists and comes earlier, fills ``path`` with
that step's output folder, makes sure that step is written out, and adds its fingerprint to the
fingerprint of the referring step: retraining the model re-runs the steps that use it.

Engine names: ``engine: NAME`` (a string) names an entry of the pipeline's ``engines:``; the loader
(:func:`bind_engine_names`) puts that engine's config, parsed once for the whole file, in its place.
A string ``engine`` means nothing else: a library call gives the engine itself (a mapping).
"""

from __future__ import annotations

from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict, Field


class StepRef(BaseModel):
    """``{step: NAME}``: the output folder of the earlier step NAME (``path`` is set by the loader)."""

    model_config = ConfigDict(extra="forbid")
    step: str = Field(description="name of an earlier step")
    path: str | None = Field(None, description="its output folder (filled in by the pipeline loader)")

    def require_path(self, who: str) -> str:
        if not self.path:
            raise ValueError(f"{who}: {{step: {self.step}}} can only be used inside a pipeline; "
                             "give a path instead in a library call")
        return self.path


def iter_refs(value: Any) -> Iterator[tuple[str, StepRef]]:
    """(option key, StepRef) for every reference inside a stage config (nested models, lists, dicts)."""
    if isinstance(value, StepRef):
        yield "", value
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            for sub, ref in iter_refs(getattr(value, key)):
                yield (f"{key}.{sub}" if sub else key), ref
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            for sub, ref in iter_refs(v):
                yield (f"{i}.{sub}" if sub else str(i)), ref
    elif isinstance(value, dict):
        for k, v in value.items():
            for sub, ref in iter_refs(v):
                yield (f"{k}.{sub}" if sub else str(k)), ref


def step_output_url(output: str, step: str) -> str:
    """The output folder of ``step`` under the pipeline ``output`` (as the runner's layout names it)."""
    from curate.pipeline.state import Layout

    layout = Layout(output)
    return layout.url_of(layout.step_dir(step))


def bind_step_refs(config: BaseModel, output: str, earlier: set[str], known: set[str]
                   ) -> tuple[list[str], list[tuple[str, str]]]:
    """Fill ``path`` of every StepRef of a stage config. Returns (referenced step names,
    problems as (option key, message)). ``earlier``: steps declared before this one."""
    names: list[str] = []
    problems: list[tuple[str, str]] = []
    for key, ref in iter_refs(config):
        if ref.step not in known:
            problems.append((key, f"unknown step {ref.step!r}"))
        elif ref.step not in earlier:
            problems.append((key, f"step {ref.step!r} comes later; a referenced step must come first"))
        else:
            ref.path = step_output_url(output, ref.step)
            names.append(ref.step)
    return list(dict.fromkeys(names)), problems



def bind_engine_names(options: dict[str, Any], engines: dict[str, Any]
                      ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``options`` with ``engine: NAME`` replaced by the parsed config ``engines[NAME]``. Returns
    (options, problems as (option key, message)); a name not in ``engines`` is a problem."""
    name = options.get("engine")
    if not isinstance(name, str):
        return options, []
    if name not in engines:
        import difflib

        close = difflib.get_close_matches(name, list(engines), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return options, [("engine", f"unknown engine {name!r}{hint}; defined engines (`engines:` at the top "
                          f"of the file): {sorted(engines) or 'none'}")]
    return {**options, "engine": engines[name]}, []
