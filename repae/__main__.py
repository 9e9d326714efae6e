"""``python -m repae``."""

from repae.cli import main

main()
