"""`python -m tuiapp.cli`: the same as the `cherry` command."""

from tuiapp.cli import main

main()
