"""`python -m dynify` runs the command line."""

from dynify.cli import main

main()
