"""``python -m choreo``: the same as the ``choreo`` command."""

from .cli.main import main

main()
