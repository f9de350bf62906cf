"""curate's numba kernels under a read-only filesystem (a container run with ``--read-only``):
a shipped read-only NUMBA_CACHE_DIR is used through a writable copy (a cache hit, no compile), and
with nothing writable at all (cache folder, HOME, TMPDIR, the package's own folder) the import
still works and the kernels compile in memory (curate/numba_cache.py)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import json, os, sys, tempfile
tempfile.tempdir = os.environ["TMPDIR"]  # no fallback to another temp folder (a read-only root has none)
from curate import numba_cache
from curate.text.heuristics import _table_bits
value = _table_bits(100)
print(json.dumps({"value": int(value), "dir": numba_cache.configure(),
                  "hits": sum(_table_bits.stats.cache_hits.values()),
                  "misses": sum(_table_bits.stats.cache_misses.values())}))
"""


def _read_only_runner(ro):
    """argv prefix + setup that makes ``ro`` read-only for the child: chmod for a normal user, a
    read-only bind mount in a private mount namespace for root (root ignores file modes)."""
    if os.geteuid() != 0:
        for folder, dirs, files in os.walk(ro):
            for name in files:
                os.chmod(os.path.join(folder, name), 0o444)
            os.chmod(folder, 0o555)
        return []
    if not shutil.which("unshare"):
        pytest.skip("running as root without unshare: cannot make a folder read-only for the child")
    ok = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if ok.returncode != 0:
        pytest.skip("running as root and unshare -m is not allowed here")
    return ["unshare", "-m", "sh", "-c",
            f'mount --bind "{ro}" "{ro}" && mount -o remount,ro,bind "{ro}" && exec "$@"', "sh"]


def _probe(prefix, src, env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=src, **env_extra)
    r = subprocess.run([*prefix, sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       timeout=120, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_read_only_cache_dir_home_and_package(tmp_path):
    ro = tmp_path / "ro"
    src = ro / "src"
    shutil.copytree(os.path.join(ROOT, "curate"), src / "curate",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cache, home, ro_tmp = ro / "numba-cache", ro / "home", ro / "tmp"
    for d in (cache, home, ro_tmp):
        d.mkdir()
    rw_tmp = tmp_path / "rw-tmp"
    rw_tmp.mkdir()

    # the image's build: a writable cache folder is filled
    built = _probe([], str(src), {"NUMBA_CACHE_DIR": str(cache), "HOME": str(home), "TMPDIR": str(rw_tmp)})
    assert built == {"value": 8, "dir": str(cache), "hits": 0, "misses": 1}
    assert any(n.startswith("heuristics._table_bits-") and n.endswith(".nbi")
               for _, _, files in os.walk(cache) for n in files)

    prefix = _read_only_runner(str(ro))
    base = {"NUMBA_CACHE_DIR": str(cache), "HOME": str(home)}
    # --read-only with a writable /tmp: the shipped cache is copied there and hit (no compile)
    shipped = _probe(prefix, str(src), {**base, "TMPDIR": str(rw_tmp)})
    copy = str(rw_tmp / f"curate-numba-{os.getuid()}")
    assert shipped == {"value": 8, "dir": copy, "hits": 1, "misses": 0}
    assert os.path.isdir(copy)
    # nothing writable at all: no crash, compiled in memory
    bare = _probe(prefix, str(src), {**base, "TMPDIR": str(ro_tmp)})
    assert bare == {"value": 8, "dir": None, "hits": 0, "misses": 1}
    # and the read-only folders were not written
    assert not os.listdir(ro_tmp) and not os.listdir(home)
