"""``python -m orchester``: the orchester command line."""

from .cli import main

main()
