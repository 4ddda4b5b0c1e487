"""A page checked in a real headless Chromium: it loads, every image decodes, and a screenshot is
written. Chromium comes from Debian (`.ci/run` installs it); tests skip without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Run after the page's load event: images that did not decode have naturalWidth 0.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0);
  document.body.setAttribute("data-probe", JSON.stringify({
    images: images.length, broken: broken.map(i => i.getAttribute("src"))}));
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH (.ci/run installs Debian's chromium as root)")
    return exe


def _run(args: list[str]) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--virtual-time-budget=10000"]  # fmt: skip
    res = subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def check_page(page: Path) -> dict:
    """{"images": n, "broken": [src, ...], "screenshot": path} for an HTML file, loaded from
    disk as a user opens it (relative image links resolve beside it)."""
    probe = page.with_name(f".probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    try:
        dom = _run(["--dump-dom", probe.resolve().as_uri()])
    finally:
        probe.unlink()
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, "the page never finished loading (no load event)"
    result = json.loads(found[1].replace("&quot;", '"'))
    shot = page.with_name(f"{page.stem}-screenshot.png")
    _run([f"--screenshot={shot.resolve()}", "--window-size=1280,4000", page.resolve().as_uri()])
    assert shot.stat().st_size > 1000
    return {**result, "screenshot": shot}
