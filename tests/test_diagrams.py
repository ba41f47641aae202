"""The documentation's diagrams are rendered from their sources as they are now (``docs/diagrams``).

Every ``docs/diagrams/NAME.dot`` has ``docs/_static/NAME.svg`` and ``NAME.png``, and the SHA-256 of
the source stamped into the SVG and written to ``docs/diagrams/NAME.sha256`` is the source's: a
source edited without rendering it again fails here (``python docs/diagrams/render.py``). None of
this needs Graphviz; only the last test, which runs the renderer into a temporary folder, does.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIAGRAMS = ROOT / "docs" / "diagrams"
STATIC = ROOT / "docs" / "_static"
RENDER = DIAGRAMS / "render.py"
SOURCES = sorted(DIAGRAMS.glob("*.dot"))
STAMP = re.compile(r"<!-- source-sha256: ([0-9a-f]{64}) ")
HOW = "run: python docs/diagrams/render.py (and commit docs/_static and docs/diagrams)"
#: Widest PNG that still reads on a documentation page (about 900 pixels), with a little slack.
MAX_WIDTH = 960


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, from its header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def test_there_are_diagrams_and_a_renderer() -> None:
    assert RENDER.exists()
    assert {p.stem for p in SOURCES} >= {"bottom-half", "task-path", "binary-star"}


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_diagram_is_rendered_from_its_current_source(source: Path) -> None:
    name, digest = source.stem, sha256(source)
    svg, png, record = STATIC / f"{name}.svg", STATIC / f"{name}.png", DIAGRAMS / f"{name}.sha256"
    for path in (svg, png, record):
        assert path.exists(), f"{path.relative_to(ROOT)} is missing: {HOW}"
    found = STAMP.search(svg.read_text(encoding="utf-8"))
    assert found is not None, f"{svg.relative_to(ROOT)} carries no source-sha256 stamp: {HOW}"
    assert found.group(1) == digest, f"{source.relative_to(ROOT)} changed since it was rendered: {HOW}"
    assert record.read_text(encoding="utf-8").split() == [digest, source.name], \
        f"{record.relative_to(ROOT)} does not match {source.name}: {HOW}"
    width, height = png_size(png)
    assert 300 <= width <= MAX_WIDTH and height >= 200, f"{png.relative_to(ROOT)} is {width}×{height} pixels"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_each_diagram_is_shown_in_a_chapter(source: Path) -> None:
    chapters = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.rst"))
    assert f"_static/{source.stem}.png" in chapters or f"_static/{source.stem}.svg" in chapters


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")
def test_the_renderer_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(RENDER), "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for source in SOURCES:
        name, digest = source.stem, sha256(source)
        svg = (tmp_path / f"{name}.svg").read_text(encoding="utf-8")
        assert svg.startswith("<?xml") and "</svg>" in svg
        found = STAMP.search(svg)
        assert found is not None and found.group(1) == digest
        assert (tmp_path / f"{name}.sha256").read_text(encoding="utf-8").split() == [digest, source.name]
        assert png_size(tmp_path / f"{name}.png")[0] > 0
    check = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr  # the committed pictures are current
