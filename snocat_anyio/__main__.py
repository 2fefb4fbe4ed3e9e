"""``python -m snocat_anyio``: the ``snocat`` command."""

from .cli import main

main()
