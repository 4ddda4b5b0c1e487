"""The browser check itself: it passes a page whose images decode and catches a broken one (the
demo's real report is checked with it in tests/test_demo.py)."""

from __future__ import annotations

import numpy as np
from browser_helpers import check_page
from PIL import Image


def test_browser_check_finds_broken_images_and_writes_a_screenshot(tmp_path):
    Image.fromarray(np.full((20, 30), 128, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    page = tmp_path / "report.html"
    page.write_text(
        "<!doctype html><html><body><h1>r</h1><img src='good.png'><img src='bad.png'>"
        "<img src='missing.png'></body></html>"
    )
    got = check_page(page)
    assert got["images"] == 3 and sorted(got["broken"]) == ["bad.png", "missing.png"], got
    assert got["screenshot"] == tmp_path / "report-screenshot.png"
    page.write_text("<!doctype html><html><body><img src='good.png'></body></html>")
    assert check_page(page)["broken"] == []
