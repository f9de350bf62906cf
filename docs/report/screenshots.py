"""Screenshots of sections of a run report (docs/report/*.png in the README), with headless Chromium.

    python docs/report/screenshots.py OUTPUT/report.html docs/report scores-score:560 mix-mixture:230 ...

Each section (from its ``<h2 id=...>`` to the next ``<h2>``) is put alone on a page with the
report's own style, its first ``<details>`` opened, and captured with ``chromium --screenshot``
(``id:height`` sets the height in pixels); Pillow, when installed, then cuts the PNG to 64 colours.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile


def main(report: str, out_dir: str, ids: list[str], width: int = 1000, height: int = 640) -> None:
    page = open(report, encoding="utf-8").read()
    head = page.split("<body>", 1)[0]
    exe = next(filter(None, (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))))
    for spec in ids:
        sid, _, h = spec.partition(":")
        m = re.search(rf"<h2 id='{re.escape(sid)}'>.*?(?=<h2 |</body>)", page, re.S)
        if not m:
            raise SystemExit(f"{report}: no section {sid!r}")
        body = m.group(0).replace("<details ", "<details open ", 1)
        with tempfile.TemporaryDirectory() as tmp:
            html_path = os.path.join(tmp, "s.html")
            with open(html_path, "w", encoding="utf-8") as f:
                f.write(head.replace("margin:2em auto", "margin:0 auto") + "<body>" + body + "</body></html>")
            png = os.path.abspath(os.path.join(out_dir, f"{sid}.png"))
            subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={tmp}/u", f"--window-size={width},{int(h or height)}",
                            f"--screenshot={png}", "file://" + html_path],
                           check=True, capture_output=True, timeout=120)
        try:
            from PIL import Image
            Image.open(png).convert("RGB").quantize(64).save(png, optimize=True)
        except ImportError:
            pass
        print(png)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
