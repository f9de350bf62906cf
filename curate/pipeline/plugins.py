"""Plugin modules (``plugins: [my_project.stages]``): your own ``@register`` stages.

A plugin module is found where Python finds any module, and also in the folder of the pipeline
file and in the working directory, so that ``my_project/stages.py`` next to ``pipeline.yaml``
works without installing it. These folders are appended to ``sys.path`` (after the installed
packages: a plugin never shadows a library). Workers of the local runner get the parent's
``sys.path`` when they start (multiprocessing passes it to every forkserver child), so they import
the plugins named in their tasks from the same folders.
"""

from __future__ import annotations

import importlib
import os
import sys


def plugin_dirs(pipeline_file: str | None) -> list[str]:
    """The folders searched for plugins besides ``sys.path``: the pipeline file's folder, then the
    working directory."""
    dirs = [os.path.dirname(os.path.abspath(pipeline_file))] if pipeline_file else []
    dirs.append(os.getcwd())
    return list(dict.fromkeys(dirs))


def import_plugins(modules: list[str], pipeline_file: str | None = None) -> list[tuple[str, str]]:
    """Import plugin modules; returns (module, reason) for each that cannot be imported."""
    if not modules:
        return []
    dirs = plugin_dirs(pipeline_file)
    new = [d for d in dirs if d not in sys.path]
    if new:
        sys.path.extend(new)
        importlib.invalidate_caches()
    problems = []
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # noqa: BLE001 - reported as a config problem naming the module
            hint = f" (searched the installed packages and {', '.join(dirs)})" \
                if isinstance(exc, ModuleNotFoundError) else ""
            problems.append((mod, f"{type(exc).__name__}: {exc}{hint}"))
    return problems
