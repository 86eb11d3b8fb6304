"""Take a PNG of a local HTML page with Debian's headless Chromium (dev tooling)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

__all__ = ["CHROMIUM", "ChromiumNotFoundError", "ScreenshotError", "screenshot"]

CHROMIUM = Path("/usr/bin/chromium")


class ChromiumNotFoundError(FileNotFoundError):
    """Chromium is not installed where ``screenshot`` looks for it."""


class ScreenshotError(RuntimeError):
    """Chromium ran but produced no screenshot."""


def screenshot(
    html_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    width: int = 1400,
    height: int = 900,
    *,
    chromium: str | os.PathLike[str] = CHROMIUM,
    timeout_s: float = 120.0,
) -> Path:
    """Render ``html_path`` at ``width`` x ``height`` CSS pixels into ``png_path``; return the PNG path."""
    browser = Path(chromium)
    if not browser.is_file():
        raise ChromiumNotFoundError(
            f"{browser} not found: install Debian's headless browser with `apt-get install -y chromium`"
        )
    page = Path(html_path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no such page: {page}")
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    # A fresh profile per call: no state, cache or lock shared with another run or a desktop browser.
    with tempfile.TemporaryDirectory(prefix="billing-chromium-") as profile:
        command = [
            str(browser),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            page.as_uri(),
        ]
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ScreenshotError(f"chromium did not finish within {timeout_s:g} s for {page}") from exc
    if finished.returncode != 0 or not png.is_file() or png.stat().st_size == 0:
        tail = "\n".join(finished.stderr.strip().splitlines()[-5:])
        raise ScreenshotError(f"chromium exited {finished.returncode} without writing {png}:\n{tail}")
    return png
