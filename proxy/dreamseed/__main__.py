"""`python -m proxy` is the `dreamseed` command."""

from .cli import main

main()
