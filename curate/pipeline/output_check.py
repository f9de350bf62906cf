"""Can a run write its output? Checked by ``curate validate`` and before ``curate run`` starts, so
that an unwritable location is one clear line naming the path, not a traceback from the middle of
a run.

Only local outputs are probed (object stores would need credentials and a network round trip here;
their errors come from the first write). Nothing is left behind: an existing folder is probed with
a temporary file, a missing one with a temporary folder in its nearest existing parent.
"""

from __future__ import annotations

import os
import tempfile

from curate.pipeline.io import get_fs, is_local


def describe_os_error(exc: OSError, what: str = "", root: str | None = None) -> str:
    """One line for an OSError: what failed, the path, and the reason (no traceback). Some calls
    (``shutil.rmtree``) report a name relative to the folder they were in: it is looked up under
    ``root`` so that the line names the full path."""
    path = os.fsdecode(exc.filename) if exc.filename is not None else ""
    if path and not os.path.isabs(path) and root and os.path.isdir(root):
        for folder, _dirs, _files in os.walk(root):
            if os.path.lexists(os.path.join(folder, path)):
                path = os.path.join(folder, path)
                break
    reason = exc.strerror or str(exc)
    lead = f"{what}: " if what else ""
    return f"{lead}{path}: {reason}" if path else f"{lead}{reason}"


def output_problem(output: str) -> str | None:
    """None when ``output`` (a local path or URL) can be created and written; otherwise a one-line
    reason naming the path."""
    fs, root = get_fs(output)
    if not is_local(fs):
        return None
    path = os.path.abspath(root)
    probe_dir = path
    while not os.path.exists(probe_dir):          # the nearest existing ancestor
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        if probe_dir == path:
            return f"output {output}: is a file, not a folder"
        return f"output {output}: {probe_dir} is a file, not a folder"
    try:
        if probe_dir == path:
            fd, tmp = tempfile.mkstemp(prefix=".curate-write-check-", dir=path)
            os.close(fd)
            os.unlink(tmp)
        else:
            os.rmdir(tempfile.mkdtemp(prefix=".curate-write-check-", dir=probe_dir))
    except OSError as exc:
        where = path if probe_dir == path else f"{probe_dir} (to create {path})"
        return f"output {output}: cannot write in {where}: {exc.strerror or exc}"
    return None
