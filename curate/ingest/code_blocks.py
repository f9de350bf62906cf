"""Keep code blocks inside list items intact through trafilatura.

trafilatura renders a list item (``<li>``, ``<dd>``) as one line: every block inside it is joined
with single spaces. For a ``<pre>`` block that destroys the code: Python's documentation puts each
function's description and examples in a ``<dl><dt>signature</dt><dd>...<pre>...</pre></dd></dl>``,
and ``>>> abs(-3)\\n3`` came out as ``>>> abs(-3) 3``. :func:`unlist_code_blocks` turns the list
elements that hold a ``<pre>`` into plain blocks (``dl``/``ul``/``ol`` and ``dd``/``li`` into
``div``, ``dt`` into ``p``) before extraction, so trafilatura keeps the lines of the code and the
paragraphs around it. Lists without code are left as they are (and keep their ``- `` markers).
"""

from __future__ import annotations

import re

_PRE = re.compile(r"<pre\b", re.I)
#: a <pre> somewhere after an opening <dd> or <li>: the cheap test before any parsing
_PRE_IN_ITEM = re.compile(r"<(?:dd|li)\b.*?<pre\b", re.I | re.S)
_LISTS = {"dl": "div", "ul": "div", "ol": "div"}
_ITEMS = {"dd": "div", "li": "div", "dt": "p"}


def has_code_in_list(html: str) -> bool:
    """True when the page may hold a ``<pre>`` inside a list item (a fast textual test)."""
    return _PRE.search(html) is not None and _PRE_IN_ITEM.search(html) is not None


def unlist_code_blocks(tree) -> int:
    """Rewrite, in place, the lists of an lxml tree whose items hold a ``<pre>``; returns how
    many list elements were rewritten (0: the tree is unchanged)."""
    changed = 0
    # the outermost lists first; their nested lists are matched by the same query
    for lst in tree.xpath("//dl[.//pre] | //ul[.//pre] | //ol[.//pre]"):
        for item in lst:
            tag = item.tag if isinstance(item.tag, str) else ""
            if tag in _ITEMS:
                item.tag = _ITEMS[tag]
        lst.tag = _LISTS[lst.tag]
        changed += 1
    return changed
