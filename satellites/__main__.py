"""``python -m satellites``: the satellite command line."""

from .cli import main

main()
