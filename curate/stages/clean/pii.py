"""``pii``: redact e-mail addresses, phone numbers and IP addresses.

Each kind is found by a regular expression and, where a regex alone is too loose, confirmed by a
validator (IP addresses by :mod:`ipaddress`; phone numbers by their digit count, 7 to 15 as in
E.164, and not looking like a date or a number range). Matches are replaced by a token per kind
(``replacements``; defaults ``<EMAIL>``, ``<PHONE>``, ``<IP>``). Kinds run in the order e-mail,
IP, phone, so that the digits of an address or an IP are never taken for a phone number.

Phone numbers recognised: North American (``(555) 123-4567``, ``555-123-4567``,
``555.123.4567``, ``+1 555 123 4567``) and international numbers written with a leading ``+``
(``+44 20 7946 0958``, ``+49 (0)30 1234567``). Bare digit runs without separators or ``+`` are
not redacted (they are mostly not phone numbers).

Counters: ``pii/email``, ``pii/phone``, ``pii/ip`` (replacements made) and ``pii/docs`` (documents
with at least one). Null texts are passed through; a non-text column is a StageError.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.pipeline.api import MapStage, Resources, StageConfig, register, require_text

Kind = Literal["email", "phone", "ip"]
ORDER: tuple[str, ...] = ("email", "ip", "phone")

EMAIL_RE = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = r"(?<![\w.])(?:" + _OCTET + r"\.){3}" + _OCTET + r"(?![\w]|\.\d)"
IPV6_RE = r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:){1,7}(?::|[0-9A-Fa-f]{1,4})(?:%\w+)?(?![\w:])"
IP_RE = re.compile(f"{IPV4_RE}|{IPV6_RE}")
PHONE_RE = re.compile(
    r"(?<![\w+.\-/])(?:"
    # international, leading +
    r"\+\d{1,3}(?:[ .\-]?\(?\d{1,4}\)?){2,6}"
    r"|"
    # North American
    r"(?:1[ .\-])?(?:\(\d{3}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}"
    r")(?![\w.\-/]?\d)")
_DATE_LIKE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$|^\d{1,2}[-./]\d{1,2}[-./]\d{2,4}$")


def _valid_ip(s: str) -> bool:
    if "." in s and ":" not in s:
        return True  # the IPv4 pattern is exact
    try:
        ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return False
    return s.count(":") >= 2 and any(ch.isdigit() or ch in "abcdefABCDEF" for ch in s)


def _valid_phone(s: str) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    if not 7 <= digits <= 15:
        return False
    return not _DATE_LIKE.match(s.strip())


PATTERNS = {"email": (EMAIL_RE, None), "ip": (IP_RE, _valid_ip), "phone": (PHONE_RE, _valid_phone)}


def redact(text: str, kinds: tuple[str, ...], replacements: dict[str, str]) -> tuple[str, dict[str, int]]:
    """(redacted text, {kind: replacements made})."""
    counts: dict[str, int] = {}
    for kind in ORDER:
        if kind not in kinds:
            continue
        regex, valid = PATTERNS[kind]
        token = replacements[kind]
        n = 0

        def sub(m: re.Match) -> str:
            nonlocal n
            s = m.group(0)
            if valid is not None and not valid(s):
                return s
            n += 1
            return token

        text = regex.sub(sub, text)
        if n:
            counts[kind] = n
    return text, counts


class PiiConfig(StageConfig):
    columns: list[str] = Field(["text"], description="text columns to redact")
    kinds: list[Kind] = Field(["email", "phone", "ip"], description="what to redact")
    replacements: dict[Kind, str] = Field(
        default_factory=lambda: {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>"},
        description="replacement token per kind (kinds missing here keep the default token)")


_DEFAULT_TOKENS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>"}


@register
class Pii(MapStage):
    """Redact e-mail addresses, phone numbers and IP addresses (counted per kind)."""

    name = "pii"
    Config = PiiConfig
    reads = ("{columns}",)
    writes = {"text": pa.string()}
    resources = Resources(cpus=1.0)

    def __init__(self, config=None, **options):
        super().__init__(config, **options)
        self._tokens = {**_DEFAULT_TOKENS, **self.config.replacements}
        self._kinds = tuple(self.config.kinds)

    def process(self, table: pa.Table) -> pa.Table:
        for col in self.config.columns:
            require_text(table.schema, col, self.step_name)
            t = table.schema.field(col).type
            if pa.types.is_null(t):
                continue
            out, changed_docs = [], 0
            for text in table.column(col).to_pylist():
                if not text:
                    out.append(text)
                    continue
                new, counts = redact(text, self._kinds, self._tokens)
                if counts:
                    changed_docs += 1
                    for k, v in counts.items():
                        self.count(f"pii/{k}", v)
                out.append(new)
            self.count("pii/docs", changed_docs)
            if changed_docs:
                table = table.set_column(table.schema.names.index(col), col, pa.array(out, t))
        return table
