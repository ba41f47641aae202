"""``python -m orchester``: the orchester command line."""

from orchester.cli.main import main

main()
