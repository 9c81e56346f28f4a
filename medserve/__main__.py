"""`python -m medserve` is the same as the `medserve` command."""

from medserve.cli import main

main()
