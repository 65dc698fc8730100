"""``python -m aimass_hpc`` is the ``aimass`` CLI."""

from aimass_hpc.cli import main

main()
