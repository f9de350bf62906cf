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
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

PROMPTS_DIR = os.path.dirname(os.path.abspath(__file__))


class PromptError(ValueError):
    pass


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

    base = folder or PROMPTS_DIR
    path = os.path.join(base, *prompt_id.split("/")) + ".yaml"
    if not os.path.isfile(path):
        raise PromptError(f"prompt {prompt_id!r}: no file {path}")
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or "version" not in data:
        raise PromptError(f"prompt file {path} must be a mapping with a `version` key")
    return data
