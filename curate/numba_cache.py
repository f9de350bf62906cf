"""Where numba keeps curate's compiled loops, so that ``import curate`` works on any filesystem.

curate's numba kernels (``curate.text.heuristics``, ``curate.text.spacy_words``,
``curate.dedup.minhash``) are ``@njit(cache=True)``: compiled once, then loaded from an on-disk
cache (a cold start compiles for tens of seconds). numba needs a *writable* cache folder; with
none it raises at import ("cannot cache function ...: no locator available"), e.g. in a container
run with ``--read-only``. :func:`configure` (called by :func:`njit` on first use) picks, in order:

1. ``NUMBA_CACHE_DIR`` when it is writable (the images set it to a folder filled at build time);
2. a read-only ``NUMBA_CACHE_DIR`` (the image's cache under ``--read-only``): copied to a
   writable temporary folder (``$TMPDIR``, e.g. a tmpfs on /tmp), then used from there, so the
   shipped compiled code still saves the cold start;
3. numba's own locations (the package's ``__pycache__``, ``~/.cache``) when one is writable;
4. a temporary folder (``$TMPDIR/curate-numba-<uid>``);
5. nothing writable at all: the kernels are compiled in memory at each start (``cache=False``),
   with a debug log line; slower, never a crash.

The choice is made once per process and exported as ``NUMBA_CACHE_DIR`` so that worker processes
make the same one. ``python -m curate.numba_cache warm`` compiles every cached kernel (the images
run it at build time).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile

log = logging.getLogger(__name__)

_state: dict[str, object] = {}


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def _default_locator_works(py_file: str) -> bool:
    """Whether numba's own cache locations (without NUMBA_CACHE_DIR) can cache a function of
    ``py_file``: the same check numba makes when a ``cache=True`` function is defined."""
    try:
        from numba.core.caching import _CacheImpl  # numba's list of locators
    except ImportError:  # pragma: no cover - another numba layout: let numba decide
        return True

    def probe():  # pragma: no cover - never called
        return None

    for cls in _CacheImpl._locator_classes:
        if cls.__name__ == "UserProvidedCacheLocator":
            continue
        try:
            if cls.from_function(probe, py_file) is not None:
                return True
        except Exception:  # noqa: BLE001 - a locator that cannot work here
            continue
    return False


def configure(py_file: str | None = None) -> str | None:
    """Chooses numba's cache folder for this process (see the module docstring). Returns the
    folder, ``""`` when numba's default location is used, or None when caching is off."""
    if "dir" in _state:
        return _state["dir"]  # type: ignore[return-value]
    from numba.core import config

    wanted = os.environ.get("NUMBA_CACHE_DIR") or ""
    chosen: str | None
    tmp = os.path.join(tempfile.gettempdir(), f"curate-numba-{os.getuid() if hasattr(os, 'getuid') else 0}")
    if wanted and _writable(wanted):
        chosen = wanted
    elif wanted and os.path.isdir(wanted) and _writable(tmp):
        # a shipped, read-only cache: a writable copy keeps the compiled code
        try:
            shutil.copytree(wanted, tmp, dirs_exist_ok=True)
        except OSError as exc:
            log.debug("numba cache %s not copied to %s: %s", wanted, tmp, exc)
        log.debug("numba cache %s is read-only: using a copy in %s", wanted, tmp)
        chosen = tmp
    elif not wanted and _default_locator_works(py_file or __file__):
        chosen = ""
    elif _writable(tmp):
        log.debug("numba cache: %s not writable, using %s", wanted or "the default location", tmp)
        chosen = tmp
    else:
        log.debug("numba cache: no writable folder (NUMBA_CACHE_DIR=%r, %s): compiling without a cache",
                  wanted, tmp)
        chosen = None
    if chosen:
        config.CACHE_DIR = chosen
        os.environ["NUMBA_CACHE_DIR"] = chosen
    elif chosen is None and wanted:
        config.CACHE_DIR = ""
        os.environ.pop("NUMBA_CACHE_DIR", None)
    _state["dir"] = chosen
    return chosen


def njit(*args, **kwargs):
    """``numba.njit`` that keeps ``cache=True`` only when a cache folder is usable (:func:`configure`)."""
    import numba

    if kwargs.get("cache"):
        caller = sys._getframe(1).f_globals.get("__file__")
        if configure(caller) is None:
            kwargs["cache"] = False
    return numba.njit(*args, **kwargs)


def cached_kernels() -> list:
    """Every ``cache=True`` kernel of curate (numba dispatchers), imported."""
    from curate.dedup import components, minhash
    from curate.text import heuristics, spacy_words

    out = []
    for mod in (heuristics, spacy_words, minhash, components):
        for name, obj in sorted(vars(mod).items()):
            if hasattr(obj, "signatures") and getattr(obj, "py_func", None) is not None \
                    and getattr(obj.py_func, "__module__", None) == mod.__name__:
                if obj.targetoptions.get("inline") == "always":
                    continue  # inlined into their callers: never compiled on their own
                out.append(obj)
    return out


def warm() -> dict[str, int]:
    """Compiles (and caches) every kernel by running the stages that use them on a few documents:
    ``heuristic_filter`` (spaCy words, Gopher/C4/FineWeb rules) and ``minhash_dedup`` (shingles,
    signatures, bands, exact Jaccard, connected components). Returns {kernel: whether its cache
    index file exists}."""
    import pyarrow as pa

    import curate

    words = ("the of and to with that have be river stone light paper window garden market winter "
             "silver engine music doctor orange forest planet bridge cotton yellow harbor").split()

    def doc(seed: int) -> str:  # varied prose: passes the cheap rules, so every kernel runs
        lines = []
        for i in range(12):
            ws = [words[(seed * 7 + i * 13 + j * j * 3 + j) % len(words)] for j in range(14)]
            lines.append(" ".join(ws).capitalize() + ".")
        return "\n".join(lines) + "\n"

    table = pa.table({"id": ["a", "b", "c", "d"], "text": [doc(1), doc(2), doc(1) + "More.", doc(3)]})
    curate.stage("heuristic_filter")(table)
    curate.stage("minhash_dedup", verify=True)(table)
    return {f"{k.py_func.__module__}.{k.py_func.__qualname__}": _index_exists(k) for k in cached_kernels()}


def _index_exists(kernel) -> bool:
    try:
        return os.path.exists(kernel._cache._cache_file._index_path)
    except AttributeError:  # caching off (NullCache) or another numba layout
        return False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["warm"]:
        print("usage: python -m curate.numba_cache warm", file=sys.stderr)
        return 2
    compiled = warm()
    cold = sorted(k for k, ok in compiled.items() if not ok)
    print(f"numba cache {configure() or '(numba default)'}: {len(compiled) - len(cold)}/{len(compiled)} "
          "kernels cached")
    if cold:
        print("not cached by the warm-up: " + ", ".join(cold), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
