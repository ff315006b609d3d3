"""`python -m lenet_dist` is the `lenet-dist` command."""

from lenet_dist.cli import main

main()
