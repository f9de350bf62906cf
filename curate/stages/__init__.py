"""The built-in stages, one module per stage, grouped by family::

    sources/  crawl, read_warc, read_files, read_parquet, read_jsonl, read_pydoc
    clean/    extract_html, language_id, heuristic_filter, pii, decontaminate
    dedup/    exact_dedup, minhash_dedup
    score/    fasttext_score, train_classifier, llm_rate, lm_yes_no_score, hf_classify
    select/   select, mix
    synth/    generate, rephrase, instruction_synth, entigraph, reading_comprehension, rc_llm, prox_refine

A stage module is an adapter: options, columns, counters. The domain logic it wraps lives in
``curate.text``, ``curate.ingest``, ``curate.dedup``, ``curate.decont``, ``curate.llm``.
A stage named ``NAME`` lives in ``curate/stages/<family>/NAME.py``; helpers start with ``_``.

The old flat module paths (``curate.stages.language_id``) still import, with a DeprecationWarning:
they name the same module object as the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

FAMILIES = ("sources", "clean", "dedup", "score", "select", "synth")

_HERE = os.path.dirname(os.path.abspath(__file__))


def module_of(name: str) -> str | None:
    """The module holding the stage (or helper) ``name``, ``curate.stages.<family>.<name>``; None if no
    family has it."""
    for family in FAMILIES:
        if os.path.isfile(os.path.join(_HERE, family, f"{name}.py")):
            return f"{__name__}.{family}.{name}"
    return None


def stage_modules() -> list[str]:
    """Every stage module (helpers, whose names start with ``_``, excluded), family by family."""
    out = []
    for family in FAMILIES:
        folder = os.path.join(_HERE, family)
        if not os.path.isdir(folder):
            continue
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".py") and not fn.startswith("_"):
                out.append(f"{__name__}.{family}.{fn[:-3]}")
    return out


class _FlatAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import curate.stages.NAME`` (the layout before families) gives the module
    ``curate.stages.<family>.NAME`` itself, so that classes, registry entries and monkeypatches are
    shared; it warns that the path is deprecated."""

    prefix = __name__ + "."

    def __init__(self) -> None:
        self._saved: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if not fullname.startswith(self.prefix):
            return None
        rest = fullname[len(self.prefix):]
        if "." in rest or rest in FAMILIES:
            return None
        target_name = module_of(rest)
        if target_name is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # noqa: D102
        new = module_of(spec.name[len(self.prefix):])
        warnings.warn(f"{spec.name} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        # the import system sets __spec__ etc. on the module it gets back; keep the real ones
        self._saved[spec.name] = module.__spec__
        return module

    def exec_module(self, module):  # noqa: D102
        module.__spec__ = self._saved.pop(module.__spec__.name)


if not any(isinstance(f, _FlatAlias) for f in sys.meta_path):
    sys.meta_path.append(_FlatAlias())
