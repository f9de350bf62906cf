"""Load a page in headless Chromium and report what a reader would see, over the DevTools protocol.

The protocol runs over a pipe (``--remote-debugging-pipe``: commands on fd 3, replies on fd 4,
NUL-separated JSON), so no websocket client or port is needed. ``load_page(path)`` returns the
console errors, uncaught exceptions and log errors (failed resource loads) seen while the page
loaded, plus the result of a JavaScript expression evaluated in it.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


class _Pipe:
    def __init__(self, exe: str, user_dir: str):
        cmd_r, self._cmd_w = os.pipe()       # we write commands, Chromium reads fd 3
        self._out_r, out_w = os.pipe()       # Chromium writes fd 4, we read

        def child() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(out_w, 4)

        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={user_dir}", "--remote-debugging-pipe",
                                      "about:blank"], pass_fds=(3, 4), preexec_fn=child,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self._id = 0
        self.messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._out_r, 1 << 16)
            if not chunk:
                self.messages.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                self.messages.put(json.loads(raw))

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if m is None:
                raise RuntimeError("Chromium closed the pipe")
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            if m is None:
                raise RuntimeError("Chromium closed the pipe")
            self.events.append(m)
            if m.get("method") == method:
                return m

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, queue.Empty, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)


def load_page(path: str, expression: str = "null", settle: float = 0.5) -> dict:
    """Open ``path`` and return {"errors": [...], "value": <expression's value>}."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed")
    with tempfile.TemporaryDirectory(prefix="curate-chromium-") as user_dir:
        p = _Pipe(exe, user_dir)
        try:
            target = p.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = p.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                p.send(f"{domain}.enable", session=session)
            p.send("Page.navigate", {"url": "file://" + os.path.abspath(path)}, session=session)
            p.wait_event("Page.loadEventFired")
            time.sleep(settle)                      # late errors (timers, failed loads)
            value = p.send("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                           session=session)
            errors = []
            for e in p.events:
                m, prm = e.get("method"), e.get("params", {})
                if m == "Runtime.consoleAPICalled" and prm.get("type") in ("error", "assert"):
                    errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                         for a in prm.get("args", [])))
                elif m == "Runtime.exceptionThrown":
                    d = prm.get("exceptionDetails", {})
                    errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
                elif m == "Log.entryAdded" and prm.get("entry", {}).get("level") == "error":
                    errors.append("log: " + prm["entry"].get("text", ""))
            return {"errors": errors, "value": value.get("result", {}).get("value")}
        finally:
            p.close()
