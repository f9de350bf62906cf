"""Code blocks inside list items keep their lines (issue 18 item 6: Python's documentation puts
each function's examples in a <dd>, and trafilatura joined them onto one line)."""

import pyarrow as pa
import trafilatura

from curate.ingest.code_blocks import has_code_in_list
from curate.stages.clean.extract_html import ExtractHtml

INTRO = "<p>" + "An introduction with enough words to count as the main content of the page. " * 3 + "</p>"


def page(body: str) -> str:
    return f"<html><head><title>Doc</title></head><body><article><h1>Functions</h1>{INTRO}{body}</article></body></html>"


SPHINX = page("""<dl class="py function"><dt class="sig">abs(x)</dt><dd><p>Return the absolute value of a number.</p>
<div class="highlight-pycon"><pre>&gt;&gt;&gt; abs(-3)
3
&gt;&gt;&gt; for i in range(2):
...     print(i)
</pre></div><p>Works on floats too.</p></dd>
<dt class="sig">bin(x)</dt><dd><p>Binary string.</p>
<dl class="py method"><dt>nested(y)</dt><dd><pre>bin(3)
'0b11'</pre></dd></dl></dd></dl>""")
BULLETS = page("<ul><li>first point of a plain list</li><li>second point of a plain list</li></ul>")
LI_CODE = page("<ol><li><p>Install it:</p><pre>pip install curate\ncurate run</pre></li><li>Done.</li></ol>")


def extract(html: str, **kw) -> str:
    out = ExtractHtml(timeout_s=None, **kw)(pa.table({"id": ["p"], "html": [html], "text": [""]}))
    return out.column("text")[0].as_py()


def test_code_in_definition_lists_keeps_its_lines():
    text = extract(SPHINX)
    assert ">>> abs(-3)\n3\n>>> for i in range(2):\n...     print(i)\n" in text
    assert "bin(3)\n'0b11'" in text
    assert "Return the absolute value of a number.\n>>> abs(-3)" in text
    assert "abs(x)\nReturn the absolute" in text          # the signature stays its own line
    # what trafilatura alone does with the same page (the defect), and the switch that keeps it
    plain = trafilatura.extract(SPHINX)
    assert ">>> abs(-3) 3 >>> for i in range(2): ... print(i)" in plain
    assert extract(SPHINX, keep_code_in_lists=False) == plain


def test_code_in_list_items():
    text = extract(LI_CODE)
    assert "pip install curate\ncurate run" in text
    assert "pip install curate curate run" in trafilatura.extract(LI_CODE)


def test_lists_without_code_are_untouched():
    assert not has_code_in_list(BULLETS)
    text = extract(BULLETS)
    assert text == trafilatura.extract(BULLETS)
    assert "- first point of a plain list\n- second point of a plain list" in text


def test_counted():
    st = ExtractHtml(timeout_s=None)
    st(pa.table({"id": ["a", "b"], "html": [SPHINX, BULLETS], "text": ["", ""]}))
    assert st.counters.to_dict()["extract_html/code_lists_unlisted"] == 1
