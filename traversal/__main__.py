"""`python -m traversal` runs the CLI (the lab uses this to run nodes with the venv's Python)."""

from traversal.cli import main

main()
