"""`python -m dreamseed` is the `dreamseed` command."""

from .cli import main

main()
