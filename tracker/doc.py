"""Write the transition tables into ``docs/tracker.rst`` (between its marker comments).

Run ``python -m tracker.doc [path]`` after changing a machine; a test fails while the
document and the declaration disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .machines import SATELLITE_MACHINE, TASK_MACHINE, CompiledMachine

MARKERS: dict[str, CompiledMachine[Any, Any]] = {"TASK": TASK_MACHINE, "SATELLITE": SATELLITE_MACHINE}


def update(text: str) -> str:
    """``text`` with every ``.. BEGIN X TABLE`` … ``.. END X TABLE`` block regenerated."""
    for name, machine in MARKERS.items():
        pattern = re.compile(rf"(\.\. BEGIN {name} TABLE\n)(.*?)(\.\. END {name} TABLE\n)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no '.. BEGIN {name} TABLE' / '.. END {name} TABLE' markers")
        block = f".. BEGIN {name} TABLE\n\n{machine.rst_table()}\n.. END {name} TABLE\n"
        text = pattern.sub(block.replace("\\", "\\\\"), text)
    return text


def main(argv: list[str] | None = None) -> int:
    """Regenerate the tables in place."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "docs/tracker.rst")
    path.write_text(update(path.read_text()))
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
