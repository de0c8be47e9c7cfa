"""Subcommands of the ``anonloader`` command that belong to no single subsystem."""
