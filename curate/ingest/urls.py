"""URL normalisation and allow-lists for crawling.

``normalize_url`` gives one spelling per page so that the crawler fetches it once: it resolves
relative links, lower-cases scheme and host, drops the default port, the fragment and empty
query, turns an empty path into ``/``, resolves ``.``/``..`` segments and normalises
percent-encoding (upper-case hex, unreserved characters decoded). Query parameter order is kept
(servers may depend on it).
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import urljoin, urlsplit, urlunsplit

HTTP_SCHEMES = ("http", "https")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _norm_pct(s: str) -> str:
    def fix(m: re.Match) -> str:
        ch = chr(int(m.group(1), 16))
        return ch if ch in _UNRESERVED else "%" + m.group(1).upper()
    s = _PCT.sub(fix, s)
    # encode characters that must not appear raw (spaces, non-ASCII)
    out = []
    for ch in s:
        if ord(ch) > 126 or ch in ' "<>\\^`{|}':
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


def _norm_path(path: str) -> str:
    if not path:
        return "/"
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if trailing and norm != "/":
        norm += "/"
    return norm


def url_scheme(url: str) -> str:
    try:
        return urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return ""


def normalize_url(url: str, base: str | None = None) -> str | None:
    """The normalised absolute http(s) URL of ``url`` (relative to ``base``), or None when it is
    not an http(s) URL or cannot be parsed."""
    try:
        url = url.strip()
        if base:
            url = urljoin(base, url)
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in HTTP_SCHEMES or not parts.hostname:
            return None
        host = parts.hostname.lower().rstrip(".")
        try:
            host = host.encode("idna").decode("ascii") if not host.isascii() else host
        except UnicodeError:
            return None
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        port = parts.port
    except ValueError:
        return None
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _norm_path(_norm_pct(parts.path))
    query = _norm_pct(parts.query)
    return urlunsplit((scheme, netloc, path, query, ""))


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def origin_of(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


class Allowlist:
    """Which URLs a crawl may fetch: hosts (a domain allows its sub-domains) and/or URL prefixes.

    A URL is allowed when its host matches one of ``domains`` (if any are given) AND it starts with
    one of ``prefixes`` (if any are given). With neither, nothing is allowed.
    """

    def __init__(self, domains: list[str] | None = None, prefixes: list[str] | None = None):
        self.domains = sorted({d.lower().strip().lstrip(".").rstrip(".") for d in domains or [] if d.strip()})
        self.prefixes = sorted({normalize_url(p) or p for p in prefixes or [] if p.strip()})

    def __bool__(self) -> bool:
        return bool(self.domains or self.prefixes)

    def allows(self, url: str) -> bool:
        if not self:
            return False
        if self.domains:
            host = host_of(url)
            if not any(host == d or host.endswith("." + d) for d in self.domains):
                return False
        if self.prefixes and not any(url.startswith(p) for p in self.prefixes):
            return False
        return True
