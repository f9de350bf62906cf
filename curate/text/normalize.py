"""Text normalisation before hashing (exact dedup).

``normalize_for_hash`` maps texts that differ only in ways readers do not see to the same string:
Unicode compatibility forms (NFKC: full-width letters, ligatures, non-breaking spaces), case, and
runs of whitespace (including newlines and trailing blanks). Optionally punctuation and digits are
removed too (a looser notion of "the same text", as in CCNet's line hashing).
"""

from __future__ import annotations

import re
import unicodedata

_PUNCT = re.compile(r"[^\w\s]+", re.UNICODE)
_DIGITS = re.compile(r"\d")


def normalize_for_hash(text: str, *, lowercase: bool = True, unicode_form: str | None = "NFKC",
                       collapse_whitespace: bool = True, remove_punctuation: bool = False,
                       replace_digits: bool = False) -> str:
    """The normalised form of ``text`` used as an exact-dedup key."""
    if unicode_form:
        text = unicodedata.normalize(unicode_form, text)
    if lowercase:
        text = text.lower()
    if remove_punctuation:
        text = _PUNCT.sub(" ", text)
    if replace_digits:
        text = _DIGITS.sub("0", text)
    if collapse_whitespace:
        text = " ".join(text.split())
    return text
