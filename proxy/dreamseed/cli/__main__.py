"""`python -m dreamseed.cli`: the `dreamseed` command."""

from . import main

main()
