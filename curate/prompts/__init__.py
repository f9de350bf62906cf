"""Versioned prompt and template files shipped with curate.

A prompt file is YAML under this folder; its id is its path without ``.yaml``
(``reading_comprehension/nli``). Every file has a ``version`` key: change it whenever the wording
changes, so outputs made with other wording can be told apart (stages put it in their fingerprint).

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
