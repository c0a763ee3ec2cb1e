"""Command-line front ends. Each sub-command is a module with ``main(argv=None)``."""
