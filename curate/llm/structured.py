"""Answer schemas and echoed worked examples, for every LLM stage.

**Schemas.** A recipe declares the JSON form of its answer as a pydantic model (``answer_schema``
on the stage class, or ``answer_schema=`` per request in :meth:`~curate.llm.stage.LLMStage.ask`). The
request carries it as an :class:`~curate.engines.AnswerSchema`: an engine with structured outputs
enforces it while decoding (openai: ``response_format`` json_schema, strict; vLLM:
``structured_outputs``), and the stage validates every answer against it either way
(:func:`validate_answer`: code fences and prose around the object are tolerated) before the
recipe's ``parse`` runs, which then reads the model instance from ``completion.parsed``. An answer
that does not validate is a parse failure (``schema``; ``no_json``, ``truncated_json``,
``invalid_json`` when there is no complete JSON object) and is asked again (``parse_retries``).

**Echoed examples.** A prompt file's worked examples (``example: {variables, answer}`` sent as
earlier turns, and ``example_answers:``, answers shown inside the prompt text) are what a small
model copies instead of answering. :class:`EchoCheck` finds an answer that repeats one: equal to
it, or containing it whole, once case, whitespace and punctuation are ignored; for a JSON example,
also an answer whose value under one of the example's keys (a text or a list of at least
:data:`MIN_CHARS` characters) is the example's. Examples shorter than :data:`MIN_CHARS` (a
one-word verdict, ``keep_doc()``) are not checked, and a request whose own input is the example's
input is exempt. Such an answer is a parse failure ``echoed_example``.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Iterable, Sequence

from curate.engines import AnswerSchema
from curate.llm.parse import ParseError, parse_json_object, strip_fences

# examples (and example values) shorter than this, once normalised, are not checked
MIN_CHARS = 20


@lru_cache(maxsize=256)
def answer_schema(model: Any, constrain: bool) -> AnswerSchema:
    """The request form of a pydantic model (computed once per model)."""
    return AnswerSchema.of(model, constrain=constrain)


def validate_answer(text: str | None, model: Any) -> Any:
    """The answer as an instance of ``model``: the first complete JSON object in ``text`` (fences
    and prose around it ignored), validated. ParseError reasons: ``empty_answer``, ``no_json``,
    ``truncated_json``, ``invalid_json`` (from :func:`~curate.llm.parse.parse_json_object`) and
    ``schema`` (a JSON object that does not match the model)."""
    from pydantic import ValidationError

    obj = parse_json_object(text)  # type: ignore[arg-type]
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                             for e in exc.errors()[:3])
        raise ParseError("schema", f"{model.__name__}: {problems}") from None


def _norm(text: str) -> str:
    return re.sub(r"[\W_]+", "", text.lower())


def _norm_value(v: Any) -> str:
    if isinstance(v, str):
        return _norm(v)
    if isinstance(v, list):
        return "|".join(_norm_value(x) for x in v)
    return _norm(json.dumps(v, sort_keys=True))


def _json(text: str) -> dict[str, Any] | None:
    try:
        return parse_json_object(text)
    except ParseError:
        return None


class EchoCheck:
    """Finds answers that repeat a worked example (see the module docstring)."""

    def __init__(self, examples: Iterable[str]):
        self.examples: list[tuple[str, str, dict[str, str]]] = []   # (raw, normalised, {key: normalised value})
        for ex in examples:
            n = _norm(ex or "")
            if len(n) < MIN_CHARS:
                continue
            obj = _json(ex) if "{" in ex else None
            fields = {k: _norm_value(v) for k, v in (obj or {}).items()}
            self.examples.append((ex.strip(), n, {k: v for k, v in fields.items() if len(v) >= MIN_CHARS}))

    @classmethod
    def of_template(cls, template: Any) -> "EchoCheck":
        """The check for a prompt template's examples (``example`` answers, ``example_answers``)."""
        answers = [a for _, a in template.example_turns()]
        extra = template.extra.get("example_answers") or []
        answers += [str(a) for a in (extra if isinstance(extra, list) else [extra])]
        return cls(answers)

    def __bool__(self) -> bool:
        return bool(self.examples)

    def check(self, answer: str | None, messages: Sequence[dict[str, str]] | None = None) -> str | None:
        """What of an example ``answer`` repeats (for the error message), or None. ``messages``:
        the request's chat messages; an example whose user turn is the request's own last message
        (the document *is* the example's) is not held against the answer."""
        if not answer or not self.examples:
            return None
        exempt = self._exempt(messages)
        a = _norm(answer)
        inner = _norm(strip_fences(answer))   # the answer in a code fence
        obj: dict[str, Any] | None = None
        for raw, n, fields in self.examples:
            if raw in exempt:
                continue
            if n in (a, inner):
                return "the whole example answer"
            if n in a:
                return "the example answer, with more around it"
            if fields:
                if obj is None:
                    obj = _json(answer) or {}
                for key, value in fields.items():
                    if key in obj and _norm_value(obj[key]) == value:
                        return f"the example's {key!r}"
        return None

    @staticmethod
    def _exempt(messages: Sequence[dict[str, str]] | None) -> set[str]:
        """Example answers whose example input is this request's own input."""
        if not messages:
            return set()
        last = messages[-1].get("content")
        out = set()
        for i in range(1, len(messages) - 1):
            m, prev = messages[i], messages[i - 1]
            if m.get("role") == "assistant" and prev.get("role") == "user" and prev.get("content") == last:
                out.add((m.get("content") or "").strip())
        return out
