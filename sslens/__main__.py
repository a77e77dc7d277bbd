"""`python -m sslens ...` (and `torchrun ... -m sslens train ...`): the same as the `sslens` command."""

from .cli import main

main()
