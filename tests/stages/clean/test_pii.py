"""pii: e-mails, phone numbers and IPs redacted and counted; look-alikes untouched."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curate.pipeline.stage import StageError
from curate.stages.clean.extract_html import ExtractHtml
from curate.stages.clean.pii import Pii, redact

from pages import PROSE, article_page, html_table, pydoc_pages

CONTACT = ("For corrections write to corrections.desk+news@daily-ledger.co.uk or call the newsroom "
           "on (555) 123-4567; the London office is on +44 20 7946 0958. Our server 192.168.10.20 "
           "and its IPv6 address 2001:db8::8a2e:370:7334 were not affected.")

LOOKALIKES = ("Published 2024-03-05 at 12:30:45, version 1.2.3.4.5, pi is 3.14159, the range "
              "1990-2000, ISBN 978-3-16-148410-0, 1,234,567 readers, ratio 10:1, std::vector, "
              "user@localhost and 999.999.999.999.")


def test_real_page_redacted_and_counted():
    page = article_page("Rates on hold", PROSE[:5] + [CONTACT, LOOKALIKES])
    t = ExtractHtml()(html_table([("https://news.example.com/en/a", page)]))
    st = Pii()
    out = st(t)
    text = out.column("text")[0].as_py()
    for secret in ("corrections.desk", "123-4567", "7946 0958", "192.168.10.20", "2001:db8"):
        assert secret not in text
    assert "<EMAIL>" in text and "<PHONE>" in text and "<IP>" in text
    assert LOOKALIKES in text  # nothing there is personal data
    c = st.counters.to_dict()
    assert c == {"pii/email": 1, "pii/phone": 2, "pii/ip": 2, "pii/docs": 1}


def test_pydoc_pages_keep_their_code():
    t = ExtractHtml()(html_table(pydoc_pages(["json", "textwrap", "smtplib"])))
    st = Pii(kinds=["phone"])
    out = st(t)
    assert out.column("text").to_pylist() == t.column("text").to_pylist()
    assert st.counters.to_dict().get("pii/phone", 0) == 0


def test_kinds_and_tokens_configurable():
    text = "Mail a@b.org, call 555-123-4567, host 10.0.0.1."
    assert redact(text, ("email",), {"email": "[E]"})[0] == "Mail [E], call 555-123-4567, host 10.0.0.1."
    st = Pii(kinds=["ip", "phone"], replacements={"ip": "0.0.0.0"})
    out = st(pa.table({"id": ["a"], "text": [text]}))
    assert out.column("text")[0].as_py() == "Mail a@b.org, call <PHONE>, host 0.0.0.0."
    assert st.counters.to_dict() == {"pii/ip": 1, "pii/phone": 1, "pii/docs": 1}
    with pytest.raises(Exception):
        Pii(kinds=["ssn"])


@pytest.mark.parametrize("s", ["(555) 123-4567", "555.123.4567", "+1 555 123 4567", "+49 (0)30 1234567",
                               "555-123-4567", "+33 1 42 68 53 00"])
def test_phone_formats(s):
    assert redact(f"call {s} now", ("phone",), {"phone": "<P>"})[0] == "call <P> now"


def test_bad_input():
    t = pa.table({"id": ["a", "b", "c"], "text": [None, "", "x@y.com"], "title": ["t", None, "u"]})
    st = Pii(columns=["text", "title"])
    out = st(t)
    assert out.column("text").to_pylist() == [None, "", "<EMAIL>"]
    assert out.num_rows == 3
    with pytest.raises(StageError, match="needs column"):
        Pii()(pa.table({"id": ["a"], "body": ["x"]}))
    with pytest.raises(StageError, match="expected text"):
        Pii()(pa.table({"id": ["a"], "text": [5]}))
