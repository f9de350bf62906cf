"""Prompt templates: every shipped template loads and renders; ids, versions, hashes, errors."""

from __future__ import annotations

import pytest

from curate.llm.prompts import TemplateError, load_template, shipped_templates
from curate.pipeline.stage import list_stages

SAMPLE = {"text": "Ada Lovelace wrote about the Analytical Engine.", "entities": ["Ada Lovelace", "Analytical Engine"],
          "summary": "A note on Lovelace.", "domain": "computing", "title": "Lovelace", "max_pairs": 3}


def test_every_shipped_template_renders():
    ids = shipped_templates()
    assert {"instruction_synth/instruct", "entigraph/entities", "entigraph/pair", "entigraph/triple",
            "rephrase/wikipedia", "rephrase/qa", "rephrase/knowledge_list"} <= set(ids)
    for tid in ids:
        t = load_template(tid)
        assert t.id == tid and t.version >= 1 and len(t.hash) == 64 and t.description
        assert t.variables() <= set(SAMPLE), (tid, t.variables())
        msgs = t.messages(**SAMPLE)
        assert msgs[-1]["role"] == "user" and SAMPLE["text"] in msgs[-1]["content"]
        assert "{{" not in msgs[-1]["content"] and "{%" not in msgs[-1]["content"]
        for m in msgs:
            assert m["content"].strip()
        if t.example_turns():
            assert [m["role"] for m in msgs][-3:] == ["user", "assistant", "user"]


def test_every_stage_template_is_valid_for_its_stage():
    for name, cls in list_stages().items():
        if cls.__module__.startswith("curate.") and hasattr(cls, "template_ids"):
            try:
                stage = cls()
            except Exception:  # noqa: BLE001  (stages needing options are covered by their own tests)
                continue
            problems = [p for p in stage.check() if p[0] != "engine.model"]
            assert problems == [], (name, problems)


def test_template_errors(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "bad.yaml").write_text("user: [unclosed")
    (d / "nouser.yaml").write_text("version: 1\nsystem: hi\n")
    (d / "nover.yaml").write_text("user: hi\n")
    (d / "syntax.yaml").write_text("version: 1\nuser: '{{ text '\n")
    (d / "ok.yaml").write_text("version: 3\nuser: 'Hello {{ name }}'\n")
    for name, msg in [("bad", "not valid YAML"), ("nouser", "needs a 'user'"), ("nover", "version"),
                      ("syntax", "syntax.yaml"), ("missing", "no prompt template")]:
        with pytest.raises(TemplateError, match=msg):
            load_template(f"r/{name}", str(tmp_path))
    t = load_template("r/ok", str(tmp_path))
    assert t.label == "r/ok@v3" and t.render(name="x") == (None, "Hello x")
    with pytest.raises(TemplateError, match="'name' is undefined"):
        t.render()
    with pytest.raises(TemplateError, match="recipe/name"):
        load_template("../etc/passwd")
    assert load_template(str(d / "ok.yaml")).id == "r/ok"  # a path works too
    # a user folder overrides a shipped template of the same id
    (tmp_path / "entigraph").mkdir()
    (tmp_path / "entigraph" / "pair.yaml").write_text("version: 9\nuser: 'mine {{ text }}'\n")
    assert load_template("entigraph/pair", str(tmp_path)).version == 9


def test_every_shipped_prompt_file_is_a_chat_template_or_a_template_set():
    from curate.prompts import load_prompt, shipped_prompts

    chat, sets = set(shipped_prompts("chat")), set(shipped_prompts("template_set"))
    assert chat and sets and not chat & sets
    assert chat | sets == set(shipped_prompts())          # no file of another kind
    assert set(shipped_templates()) == chat
    for pid in sets:                                        # rendered by tests/stages/synth/test_reading_comprehension.py
        data = load_prompt(pid)
        assert isinstance(data["version"], int) and data["version"] >= 1
