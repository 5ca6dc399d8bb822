"""`python -m tether ...` (and `torchrun -m tether ...`) is the `tether` command."""

from tether.cli import entry

entry()
