"""`python -m kneegen` runs the same CLI as the `kneegen` console script; torchrun starts its
processes this way: `torchrun --nproc_per_node 2 -m kneegen train …`."""

from kneegen.cli import main

if __name__ == "__main__":
    main()
