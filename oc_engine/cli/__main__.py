"""`python -m oc_engine.cli`: the `oc-engine` command."""

from oc_engine.cli import main

main()
