"""The stages' layout: one module per stage, grouped by family, each found by the registry by its
name; the old flat module paths still import (the same module, with a DeprecationWarning)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import curate.stages as stages_pkg
from curate.pipeline.stage import get_stage, list_stages
from helpers import ROOT


def test_every_stage_module_sits_in_a_family_and_registers_its_stage():
    here = os.path.dirname(stages_pkg.__file__)
    loose = [f for f in os.listdir(here) if f.endswith(".py") and f != "__init__.py"]
    assert loose == []                                              # no stage outside a family
    modules = stages_pkg.stage_modules()
    by_module = {cls.__module__: name for name, cls in list_stages().items()
                 if cls.__module__.startswith("curate.stages.")}   # not the tests' plugin stages
    assert sorted(by_module) == sorted(modules)                     # each module is one stage
    for module, name in by_module.items():
        family = module.split(".")[2]
        assert family in stages_pkg.FAMILIES and module.endswith("." + name)
        assert stages_pkg.module_of(name) == module


def test_a_worker_imports_only_the_module_of_the_stage_it_runs():
    code = ("import sys; from curate.pipeline.stage import get_stage; get_stage('pii'); "
            "print(sorted(m for m in sys.modules if m.startswith('curate.stages.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "['curate.stages.clean', 'curate.stages.clean.pii']"


def test_the_old_flat_module_path_is_the_same_module_with_a_warning():
    sys.modules.pop("curate.stages.language_id", None)   # warns on its first import only
    with pytest.warns(DeprecationWarning, match="curate.stages.language_id moved to curate.stages.clean.language_id"):
        old = importlib.import_module("curate.stages.language_id")
    new = importlib.import_module("curate.stages.clean.language_id")
    assert old is new and old.__name__ == old.__spec__.name == "curate.stages.clean.language_id"
    assert get_stage("language_id") is old.LanguageId
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("curate.stages.no_such_stage")
