"""Versioned prompt and template files shipped with curate.

A prompt file is YAML under this folder; its id is its path without ``.yaml``
(``reading_comprehension/nli``). Every file has a ``version`` key: change it whenever the wording
changes, so outputs made with other wording can be told apart (stages put it in their fingerprint).

Two kinds of file live here: chat templates of the LLM stages (``kind: chat``, the default; a
``user`` message and optional ``system``, see ``curate.llm.prompts``) and template sets
(``kind: template_set``): lists of question/answer wordings that a stage without an LLM fills in
(``reading_comprehension``).

``load_prompt(id)`` returns the parsed mapping; ``load_prompt(id, folder)`` reads ``<folder>/<id>.yaml``
instead (a user's own wording with the same structure).

This module is the one place that knows where prompt files are (``PROMPTS_DIR``, ``prompt_file``);
``curate.llm.prompts`` parses chat templates on top of it. The stage option naming a folder of your
own prompt files is ``prompts_dir`` for every stage (``templates``, its old name in
``reading_comprehension`` and ``rc_llm``, is still accepted with a warning: ``renamed_prompts_dir``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

PROMPTS_DIR = os.path.dirname(os.path.abspath(__file__))


class PromptError(ValueError):
    pass


def prompt_file(prompt_id: str, folder: str | None = None, *, shipped: bool = True) -> str | None:
    """The file of prompt ``recipe/name``: ``<folder>/<id>.yaml`` when ``folder`` has it, else the
    shipped one (``shipped``: also look there when a folder is given); None when neither exists."""
    bases = ([folder] if folder else []) + ([PROMPTS_DIR] if shipped or not folder else [])
    for base in bases:
        path = os.path.join(os.path.expanduser(base), *prompt_id.split("/")) + ".yaml"
        if os.path.isfile(path):
            return path
    return None


def renamed_prompts_dir(data: Any, stage: str) -> Any:
    """A stage config's ``templates:`` (the old name of ``prompts_dir``) moved to ``prompts_dir``,
    with a warning; both at once is an error. For a ``mode="before"`` model validator."""
    if isinstance(data, dict) and "templates" in data:
        import logging

        data = dict(data)
        old = data.pop("templates")
        if old is not None and data.get("prompts_dir") not in (None, old):
            raise ValueError("give prompts_dir only (templates is its old name)")
        logging.getLogger("curate").warning(
            "%s: option `templates` is deprecated; call it `prompts_dir` (same meaning)", stage)
        if data.get("prompts_dir") is None:
            data["prompts_dir"] = old
    return data


def shipped_prompts(kind: str | None = None) -> list[str]:
    """Ids of every prompt file shipped with curate (of one ``kind`` when given)."""
    import yaml

    out = []
    for recipe in sorted(os.listdir(PROMPTS_DIR)):
        d = os.path.join(PROMPTS_DIR, recipe)
        if not os.path.isdir(d) or recipe.startswith(("_", ".")):
            continue
        for f in sorted(os.listdir(d)):
            if not f.endswith(".yaml"):
                continue
            if kind is not None:
                with open(os.path.join(d, f), encoding="utf-8") as fh:
                    data = yaml.safe_load(fh)
                if (data.get("kind", "chat") if isinstance(data, dict) else None) != kind:
                    continue
            out.append(f"{recipe}/{f[:-5]}")
    return out


@lru_cache(maxsize=64)
def load_prompt(prompt_id: str, folder: str | None = None) -> dict[str, Any]:
    import yaml

    path = prompt_file(prompt_id, folder, shipped=False)
    if path is None:
        expected = os.path.join(folder or PROMPTS_DIR, *prompt_id.split("/")) + ".yaml"
        raise PromptError(f"prompt {prompt_id!r}: no file {expected}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or "version" not in data:
        raise PromptError(f"prompt file {path} must be a mapping with a `version` key")
    return data
