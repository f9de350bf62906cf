"""Prompt templates: versioned YAML files loaded by id.

A template lives in ``curate/prompts/<recipe>/<name>.yaml`` and its id is ``<recipe>/<name>``::

    version: 1
    description: what it asks for
    system: optional system message (Jinja)
    user: the user message (Jinja; variables such as {{ text }})
    prefix: optional text the answer must start with (checked by stages that care)
    example: optional worked example {variables: {...}, answer: ...} (or a list), sent as an
             earlier user/assistant turn
    example_answers: optional answers shown inside the prompt text (a string or a list); with the
             ``example`` answers, an answer repeating one is a parse failure ``echoed_example``
             (see :mod:`curate.llm.structured`)

Templates are Jinja2 with ``StrictUndefined``: a variable the caller does not supply is an error
when rendering, and :meth:`PromptTemplate.variables` lists the names a template uses so a stage
can reject, at validate time, a template naming a column it will not have. ``hash`` is the
sha256 of the file's bytes; stages put it in their step fingerprint, so editing a prompt
recomputes that step (and only that step and what follows).

A stage option ``prompts_dir`` (a folder with the same ``<recipe>/<name>.yaml`` layout) overrides
the shipped templates; a template file path works too.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import yaml

from curate.prompts import PROMPTS_DIR, prompt_file


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class PromptTemplate:
    id: str
    version: int
    user: str
    system: str | None = None
    description: str = ""
    prefix: str | None = None
    path: str = ""
    hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def variables(self) -> set[str]:
        """Names the template reads (undeclared Jinja variables of the system and user parts)."""
        from jinja2 import meta

        env = _env()
        names: set[str] = set()
        for part in (self.system, self.user):
            if part:
                names |= meta.find_undeclared_variables(env.parse(part))
        return names

    def render(self, **variables: Any) -> tuple[str | None, str]:
        """(system message or None, user message)."""
        from jinja2 import UndefinedError

        try:
            system = _compile(self.system).render(**variables).strip() if self.system else None
            user = _compile(self.user).render(**variables).strip()
        except UndefinedError as exc:
            raise TemplateError(f"template {self.id!r}: {exc}") from None
        return system, user

    def example_turns(self) -> list[tuple[dict[str, Any], str]]:
        """The template's worked examples: ``example: {variables: {...}, answer: ...}`` (or a list
        of them), sent as earlier user/assistant turns (small models follow a format better)."""
        ex = self.extra.get("example")
        items = ex if isinstance(ex, list) else [ex] if ex else []
        return [(dict(e.get("variables") or {}), str(e.get("answer") or "").strip()) for e in items]

    def messages(self, *, examples: bool = True, **variables: Any) -> list[dict[str, str]]:
        """Chat messages: system, the worked examples (``examples``), then the user message."""
        system, user = self.render(**variables)
        msgs = [{"role": "system", "content": system}] if system else []
        for ex_vars, answer in (self.example_turns() if examples else []):
            msgs += [{"role": "user", "content": self.render(**{**variables, **ex_vars})[1]},
                     {"role": "assistant", "content": answer}]
        return msgs + [{"role": "user", "content": user}]

    @property
    def label(self) -> str:
        return f"{self.id}@v{self.version}"


@lru_cache(maxsize=1)
def _env() -> Any:
    from jinja2 import Environment, StrictUndefined

    return Environment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


@lru_cache(maxsize=256)
def _compile(source: str) -> Any:
    return _env().from_string(source)


def template_path(template_id: str, prompts_dir: str | None = None) -> str:
    """The file of a template id (``recipe/name``), or of a path given directly."""
    if template_id.endswith((".yaml", ".yml")) and os.path.exists(os.path.expanduser(template_id)):
        return os.path.abspath(os.path.expanduser(template_id))
    if "/" not in template_id or template_id.startswith("/") or ".." in template_id.split("/"):
        raise TemplateError(f"template id {template_id!r} must look like 'recipe/name'")
    p = prompt_file(template_id, prompts_dir)
    if p is not None:
        return p
    where = f"{prompts_dir} or {PROMPTS_DIR}" if prompts_dir else PROMPTS_DIR
    raise TemplateError(f"no prompt template {template_id!r} in {where}")


def load_template(template_id: str, prompts_dir: str | None = None) -> PromptTemplate:
    """Load (and check) a template by id or path."""
    path = template_path(template_id, prompts_dir)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TemplateError(f"prompt template {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        raise TemplateError(f"prompt template {path}: needs a 'user' message")
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise TemplateError(f"prompt template {path}: 'version' must be a positive integer")
    ex = data.get("example")
    for e in (ex if isinstance(ex, list) else [ex] if ex is not None else []):
        if not isinstance(e, dict) or not isinstance(e.get("answer"), str) or not isinstance(e.get("variables", {}), dict):
            raise TemplateError(f"prompt template {path}: 'example' needs 'variables' (a mapping) and 'answer'")
    ea = data.get("example_answers")
    if ea is not None and not (isinstance(ea, str) or (isinstance(ea, list) and all(isinstance(a, str) for a in ea))):
        raise TemplateError(f"prompt template {path}: 'example_answers' must be a string or a list of strings")
    known = {"version", "description", "system", "user", "prefix"}
    tid = template_id if not template_id.endswith((".yaml", ".yml")) else \
        f"{os.path.basename(os.path.dirname(path))}/{os.path.splitext(os.path.basename(path))[0]}"
    t = PromptTemplate(id=tid, version=version, user=data["user"], system=data.get("system"),
                       description=str(data.get("description") or ""), prefix=data.get("prefix"),
                       path=path, hash=hashlib.sha256(raw).hexdigest(),
                       extra={k: v for k, v in data.items() if k not in known})
    try:
        t.variables()
    except Exception as exc:  # jinja2.TemplateSyntaxError
        raise TemplateError(f"prompt template {path}: {exc}") from None
    return t


def shipped_templates() -> list[str]:
    """Ids of every chat template shipped with curate (template sets are ``curate.prompts``')."""
    from curate.prompts import shipped_prompts
    return shipped_prompts(kind="chat")
