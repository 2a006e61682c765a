"""`python -m colocate`: the same as the `colocate` command."""

from colocate.cli import main

main()
