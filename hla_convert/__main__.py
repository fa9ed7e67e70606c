"""`python -m hla_convert ...` runs the command line, for environments without the console script."""

from .cli.entry import main

main()
