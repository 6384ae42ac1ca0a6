"""`python -I -m sklookupctl`: what the installed `sklookupctl` command runs (see scripts/setup:
-I, so that no PYTHON* variable a `sudo -E` kept decides what root's Python loads)."""

from sklookupctl.cli import main

main()
