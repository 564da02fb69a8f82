"""`python -m qvggt_export.cli` (what torchrun launches with -m)."""

from . import main

main()
