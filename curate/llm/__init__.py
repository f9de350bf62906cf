"""The LLM stage layer: base stage, parse helpers, prompt templates, chunking, accounting, budgets.

See :mod:`curate.llm.stage` for how a new LLM stage is written.
"""

from curate.llm.accounting import Budget, LLMAccounting
from curate.llm.chunking import split_text
from curate.llm.parse import (ParseError, parse_bullets, parse_json_object, parse_scored_lines,
                              parse_tagged_pairs, strip_fences)
from curate.llm.prompts import PromptTemplate, TemplateError, load_template, shipped_templates

__all__ = ["Budget", "LLMAccounting", "ParseError", "PromptTemplate", "TemplateError", "load_template",
           "parse_bullets", "parse_json_object", "parse_scored_lines", "parse_tagged_pairs",
           "shipped_templates", "split_text", "strip_fences"]
