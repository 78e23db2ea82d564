"""`python -m kneegen` runs the same CLI as the `kneegen` console script."""

from kneegen.cli import main

main()
