"""A PNG of the fixture's timeline through Debian's headless Chromium (skipped where it is not installed)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from billing_local.screenshot import CHROMIUM, ChromiumNotFoundError, screenshot
from billing_local.timeline import write_timeline

RUN_SMALL = Path(__file__).resolve().parent.parent / "fixtures" / "apm" / "run-small.ndjson"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    # The first chunk of every PNG is IHDR: width and height are its first two big-endian uint32s.
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_screenshot_of_the_timeline_is_a_png_of_the_requested_size(tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    # Given the fixture's timeline page
    page = tmp_path / "run.html"
    write_timeline(RUN_SMALL, page)

    # When it is photographed at a size other than the default
    png = screenshot(page, tmp_path / "run.png", width=1000, height=700)

    # Then a non-empty PNG of exactly that size exists
    assert png.stat().st_size > 0
    assert png_size(png) == (1000, 700)


def test_missing_chromium_is_reported_with_how_to_install_it(tmp_path: Path) -> None:
    # Given a page and a browser path that does not exist
    page = tmp_path / "run.html"
    page.write_text("<!DOCTYPE html><title>t</title>", encoding="utf-8")

    # When a screenshot is asked for
    with pytest.raises(ChromiumNotFoundError) as raised:
        screenshot(page, tmp_path / "run.png", chromium=tmp_path / "no-chromium")

    # Then the error says which binary is missing and how to get it
    assert str(raised.value).startswith(f"{tmp_path / 'no-chromium'} not found")
    assert "apt-get install -y chromium" in str(raised.value)
