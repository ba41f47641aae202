"""Render the documentation's diagrams: every ``docs/diagrams/*.dot`` to an SVG and a PNG.

The diagrams are Graphviz sources kept in the repository; the pictures the chapters show are
made from them, never drawn by hand. For each ``NAME.dot`` this writes

* ``docs/_static/NAME.svg``, with the SHA-256 of the source stamped into it as an XML comment
  (``<!-- source-sha256: … -->``);
* ``docs/_static/NAME.png``, at :data:`DPI` dots per inch (readable on a page about 900 pixels wide);
* ``docs/diagrams/NAME.sha256``: the same digest, in ``sha256sum``'s format.

``tests/test_diagrams.py`` checks, without Graphviz, that every source has its pictures and that
the stamped digests match the sources as they are now: a source edited without running this
script again fails there.

Run from anywhere (Graphviz's ``dot`` must be on ``PATH``: ``apt-get install graphviz``)::

    python docs/diagrams/render.py                   # into docs/_static and docs/diagrams
    python docs/diagrams/render.py --out /tmp/pics   # everything into /tmp/pics instead
    python docs/diagrams/render.py --check           # only say which pictures are stale (exit 1)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: Where the sources are (this file's folder), and where the pictures go by default.
DIAGRAMS = Path(__file__).resolve().parent
STATIC = DIAGRAMS.parent / "_static"
#: Resolution of the PNGs: 110 dpi keeps Graphviz's 10-11 pt labels readable at about 900 pixels wide.
DPI = 110
#: The comment stamped into each SVG, and how it is found again.
STAMP = "<!-- source-sha256: {digest} (docs/diagrams/{name}.dot; python docs/diagrams/render.py) -->"
STAMP_RE = re.compile(r"<!-- source-sha256: ([0-9a-f]{64}) ")
#: Seconds one run of ``dot`` may take.
DOT_TIMEOUT = 120


def sources(folder: Path = DIAGRAMS) -> list[Path]:
    """The diagram sources in ``folder``, by name."""
    return sorted(folder.glob("*.dot"))


def digest(source: Path) -> str:
    """The SHA-256 of a source file's bytes, in hex."""
    return hashlib.sha256(source.read_bytes()).hexdigest()


def stamp(svg: str, name: str, sha: str) -> str:
    """``svg`` with the source's digest as a comment after the XML declaration (at the top without one)."""
    comment = STAMP.format(digest=sha, name=name)
    if svg.startswith("<?xml"):
        end = svg.index("?>") + 2
        return f"{svg[:end]}\n{comment}{svg[end:]}"
    return f"{comment}\n{svg}"


def stamped(svg: str) -> str | None:
    """The digest stamped into an SVG's text, or ``None`` when it has none."""
    match = STAMP_RE.search(svg)
    return match.group(1) if match else None


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _dot(dot: str, source: Path, *args: str) -> bytes:
    """What ``dot ARGS SOURCE`` prints; a failure raises :class:`RuntimeError` with its message."""
    run = subprocess.run([dot, *args, str(source)], capture_output=True, timeout=DOT_TIMEOUT, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"dot failed on {source.name} ({run.returncode}): {run.stderr.decode(errors='replace')}")
    return run.stdout


def render(source: Path, images: Path, hashes: Path, dot: str = "dot", dpi: int = DPI) -> list[Path]:
    """Render one source into ``images`` (``NAME.svg``, ``NAME.png``) and ``hashes`` (``NAME.sha256``);
    returns the files written."""
    name, sha = source.stem, digest(source)
    svg = stamp(_dot(dot, source, "-Tsvg").decode(), name, sha)
    png = _dot(dot, source, "-Tpng", f"-Gdpi={dpi}")
    written = [images / f"{name}.svg", images / f"{name}.png", hashes / f"{name}.sha256"]
    _write(written[0], svg.encode())
    _write(written[1], png)
    _write(written[2], f"{sha}  {source.name}\n".encode())
    return written


def stale(folder: Path = DIAGRAMS, images: Path = STATIC, hashes: Path | None = None) -> list[str]:
    """What is missing or out of date for the sources in ``folder`` (an empty list: all is current)."""
    hashes = folder if hashes is None else hashes
    problems = []
    for source in sources(folder):
        name, sha = source.stem, digest(source)
        svg, png, record = images / f"{name}.svg", images / f"{name}.png", hashes / f"{name}.sha256"
        for path in (svg, png, record):
            if not path.exists():
                problems.append(f"{path} is missing")
        if svg.exists() and stamped(svg.read_text(encoding="utf-8")) != sha:
            problems.append(f"{svg} was not rendered from {source.name} as it is now")
        if record.exists() and record.read_text(encoding="utf-8").split()[:1] != [sha]:
            problems.append(f"{record} does not match {source.name}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (0 done; 1 ``dot`` failed, or stale pictures with ``--check``;
    2 no ``dot``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the SVGs, PNGs and .sha256 files into this folder instead "
                             f"(default: pictures into {STATIC}, digests into {DIAGRAMS})")
    parser.add_argument("--dpi", type=int, default=DPI, help="resolution of the PNGs (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="render nothing; list stale pictures, exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale()
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run: python docs/diagrams/render.py", file=sys.stderr)
        return 1 if problems else 0
    dot = shutil.which("dot")
    if dot is None:
        print("error: Graphviz's dot is not on PATH (apt-get install graphviz)", file=sys.stderr)
        return 2
    images: Path = args.out or STATIC
    hashes: Path = args.out or DIAGRAMS
    images.mkdir(parents=True, exist_ok=True)
    hashes.mkdir(parents=True, exist_ok=True)
    for source in sources():
        try:
            written = render(source, images, hashes, dot, args.dpi)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        for path in written:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
