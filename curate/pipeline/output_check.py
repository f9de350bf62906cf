"""Can a run write its output? Checked by ``curate validate`` and before ``curate run`` starts, so
that an unwritable location is one clear line naming the path, not a traceback from the middle of
a run.

A local output is probed with a temporary file (an existing folder) or a temporary folder in its
nearest existing parent (a missing one). An object-store output (``s3://``, ``gs://``...) is
probed by writing, then deleting, one small object under ``<output>/_curate/`` with the
credentials the run will use (a run needs both: an atomic write there is a copy and a delete).
Nothing is left behind. Only definite answers stop the run (no credentials, access denied, no
such bucket); a network error at the probe is logged as a warning and the run goes on (its first
write then fails and is retried like any transient failure).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

from curate.pipeline.io import get_fs, is_local

log = logging.getLogger(__name__)

_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError", "DefaultCredentialsError",
                      "RefreshError", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                      "InvalidToken")
CREDENTIALS_HINT = ("credentials come from the environment of `curate run` (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_ENDPOINT_URL; "
                    "GOOGLE_APPLICATION_CREDENTIALS for gs://) or ~/.aws (README, \"Object stores\")")


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


def _remote_problem(fs, root: str, output: str) -> str | None:
    probe = f"{root.rstrip('/')}/_curate/.write-check-{uuid.uuid4().hex}"
    step = "write"
    try:
        with fs.open(probe, "wb") as f:
            f.write(b"curate write check\n")
        step = "delete"
        fs.rm(probe)
        return None
    except Exception as exc:  # noqa: BLE001 - classified below; the backends raise many kinds
        why = _describe_remote_error(exc)
        if why is None:
            log.warning("output %s: the write check could not reach the object store (%s: %s); going on",
                        output, type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            return None
        where = probe if step == "delete" else f"{root.rstrip('/')}/_curate/"
        return f"output {output}: cannot {step} {where}: {why}"


def _describe_remote_error(exc: BaseException) -> str | None:
    """A one-line reason for a definite failure (credentials, permission, missing bucket), None
    for anything that may be transient (network, throttling)."""
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if any(name in text for name in _CREDENTIAL_ERRORS):
        return f"no usable credentials ({first}); {CREDENTIALS_HINT}"
    if any(isinstance(c, PermissionError) for c in chain) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({first}); {CREDENTIALS_HINT}"
    if any(isinstance(c, FileNotFoundError) for c in chain) or "NoSuchBucket" in text:
        return f"no such bucket or container ({first})"
    return None


def output_problem(output: str, probe_remote: bool = True) -> str | None:
    """None when ``output`` (a local path or URL) can be created and written; otherwise a one-line
    reason naming the path. ``probe_remote=False`` skips object stores."""
    fs, root = get_fs(output)
    if not is_local(fs):
        return _remote_problem(fs, root, output) if probe_remote else None
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
