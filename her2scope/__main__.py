"""``python -m her2scope``: the command line (``her2scope --help``)."""

from her2scope.clients.cli import run

run()
