"""Charset detection and decoding of fetched/archived/local bytes.

Order of evidence (the HTML standard's, simplified):

1. a byte-order mark (UTF-8/16) - always wins,
2. the charset of the HTTP ``Content-Type`` header,
3. ``<meta charset=...>`` / ``<meta http-equiv="Content-Type" content="...; charset=...">``
   in the first bytes of an HTML document,
4. UTF-8 (the common case, checked strictly and fast),
4b. for a short input (under ``SHORT_BYTES``) that reads as Western European text in windows-1252
   (every non-ASCII character a Latin-1 letter or one of ``¡¿«»°‘’“”–—…€``, none next to another non-ASCII
   character, as accents are in "café" or "Smørrebrød"): windows-1252. On a few bytes the
   detector cannot decide and guesses anything from cp1250 to Big5 ("café" became "cafķ");
   cp1251 Cyrillic or cp1250 Polish read in cp1252 give runs of accented letters or symbols
   instead, and go on to the detector,
5. ``charset_normalizer``'s guess,
6. windows-1252 (the legacy default of unlabelled web pages),

the first of 2-6 that decodes the bytes without error is used (a wrong declaration is common on
the web); when none does, the first one with undecodable bytes replaced by U+FFFD. Exception: a
page declared UTF-8 that has only a few invalid bytes stays UTF-8 (stray bytes replaced and
reported), because a single-byte codec would "succeed" and silently garble every accent.

Labels browsers treat as windows-1252 (``iso-8859-1``, ``latin1``, ``us-ascii``) are decoded as
``cp1252``, as browsers do. Bytes the chosen codec cannot decode become U+FFFD and the result says
so (``replaced=True``) so callers can count it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Iterator

_HEADER_CHARSET = re.compile(rb"""charset\s*=\s*["']?\s*([A-Za-z0-9._:\-]+)""", re.I)
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9._:\-]+)""", re.I)
META_SCAN_BYTES = 4096
SHORT_BYTES = 4096   # below this, a detector's guess is unreliable (see _western)
DETECT_SAMPLE_BYTES = 64 * 1024

# WHATWG encoding standard: these labels mean windows-1252
_AS_CP1252 = {"iso-8859-1", "iso8859-1", "latin1", "latin-1", "l1", "us-ascii", "ascii", "cp819",
              "ibm819", "iso-ir-100", "iso_8859-1", "windows-1252", "cp1252", "x-cp1252"}


@dataclass
class Decoded:
    text: str
    charset: str          # the codec used (Python name)
    how: str              # bom | header | meta | utf-8 | short | detected | default
    replaced: bool        # some bytes could not be decoded and became U+FFFD


def normalize_charset(label: str | bytes | None) -> str | None:
    """A Python codec name for a charset label, or None when unknown."""
    if not label:
        return None
    if isinstance(label, bytes):
        label = label.decode("ascii", "ignore")
    label = label.strip().strip("\"'").lower()
    if label in _AS_CP1252:
        return "cp1252"
    if label in ("utf8", "unicode-1-1-utf-8"):
        label = "utf-8"
    try:
        return codecs.lookup(label).name
    except LookupError:
        return None


def header_charset(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type header value, normalized (None if absent/unknown)."""
    if not content_type:
        return None
    m = _HEADER_CHARSET.search(content_type.encode("latin-1", "ignore"))
    return normalize_charset(m.group(1)) if m else None


def meta_charset(head: bytes) -> str | None:
    """The charset declared by a ``<meta>`` tag in the first bytes of an HTML document."""
    m = _META_CHARSET.search(head[:META_SCAN_BYTES])
    cs = normalize_charset(m.group(1)) if m else None
    # a meta tag cannot really declare UTF-16 (the bytes we just parsed were ASCII-compatible)
    if cs and cs.startswith("utf-16"):
        cs = "utf-8"
    return cs


def _bom(data: bytes) -> tuple[str, int] | None:
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8", 3
    if data.startswith(codecs.BOM_UTF16_LE):
        return "utf-16-le", 2
    if data.startswith(codecs.BOM_UTF16_BE):
        return "utf-16-be", 2
    return None


def _mostly_utf8(data: bytes, how: str) -> Decoded | None:
    """A page declared UTF-8 that is UTF-8 but for a few stray bytes is decoded as UTF-8 with the
    stray bytes replaced (as browsers do), not re-guessed as a single-byte codec that would garble
    every non-ASCII character without any error. Returns None when the declaration looks wrong
    (many invalid sequences: then the other candidates are tried)."""
    try:
        return Decoded(data.decode("utf-8"), "utf-8", how, False)
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    valid = sum(1 for ch in text if ord(ch) > 127) - bad
    if valid >= bad:  # most non-ASCII text is valid UTF-8: stray bytes, not a wrong label
        return Decoded(text, "utf-8", how, True)
    return None


def _decode(data: bytes, charset: str, how: str) -> Decoded:
    try:
        return Decoded(data.decode(charset), charset, how, False)
    except UnicodeDecodeError:
        return Decoded(data.decode(charset, errors="replace"), charset, how, True)


_WESTERN_EXTRA = set("¡¿«»°‘’“”–—…€")


def _western(data: bytes) -> bool:
    """Short bytes that read as Western European text in windows-1252 (see the module docstring)."""
    if len(data) >= SHORT_BYTES:
        return False
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return False
    prev_high = False
    seen = False
    for ch in text:
        high = ord(ch) > 127
        if high:
            if prev_high or not ((0xC0 <= ord(ch) <= 0xFF and ch not in "×÷") or ch in _WESTERN_EXTRA):
                return False
            seen = True
        prev_high = high
    return seen


def _candidates(data: bytes, content_type: str | None, html: bool) -> Iterator[tuple[str, str]]:
    cs = header_charset(content_type)
    if cs:
        yield cs, "header"
    if html:
        cs = meta_charset(data)
        if cs:
            yield cs, "meta"
    yield "utf-8", "utf-8"
    if _western(data):
        yield "cp1252", "short"
    try:
        from charset_normalizer import from_bytes

        matches = from_bytes(data[:DETECT_SAMPLE_BYTES])
        best = matches.best()
        if best is not None:
            # on a tie (short samples often tie), prefer windows-1252, the most common legacy charset
            for m in matches:
                if (m.chaos, m.coherence) == (best.chaos, best.coherence) and (
                        "cp1252" in m.could_be_from_charset):
                    best = m
                    break
        cs = normalize_charset(best.encoding) if best is not None else None
        # UTF-16/32 guesses on data without NUL bytes are wrong (short samples fool the detector)
        if cs and not (cs.startswith(("utf-16", "utf-32")) and b"\x00" not in data[:DETECT_SAMPLE_BYTES]):
            yield cs, "detected"
    except Exception:  # noqa: BLE001 - detection is best effort
        pass
    # the web's legacy default for unlabelled documents (WHATWG); decodes almost any byte string
    yield "cp1252", "default"


def decode_bytes(data: bytes, content_type: str | None = None, html: bool = True) -> Decoded:
    """Decode ``data``: the first charset of the evidence list (see the module docstring) that
    decodes the bytes without error wins. When none does (or the declared charset is wrong and the
    rest fail too), the first declared charset is used and undecodable bytes become U+FFFD
    (``replaced=True``)."""
    bom = _bom(data)
    if bom:
        return _decode(data[bom[1]:], bom[0], "bom")
    first = None
    for charset, how in _candidates(data, content_type, html):
        if first is None:
            first = (charset, how)
            if how in ("header", "meta") and codecs.lookup(charset).name == "utf-8":
                mostly = _mostly_utf8(data, how)
                if mostly is not None:
                    return mostly
        try:
            return Decoded(data.decode(charset), charset, how, False)
        except (UnicodeDecodeError, LookupError):
            continue
    charset, how = first or ("utf-8", "fallback")
    return _decode(data, charset, how)


def detect_charset(data: bytes, content_type: str | None = None, html: bool = True) -> tuple[str, str]:
    """(codec, how) that ``decode_bytes`` would use."""
    d = decode_bytes(data, content_type, html)
    return d.charset, d.how


def looks_binary(data: bytes, sample: int = 8192) -> bool:
    """True when the start of ``data`` looks like a binary file (NUL bytes, no UTF-16 BOM)."""
    head = data[:sample]
    if _bom(head):
        return False
    return b"\x00" in head
