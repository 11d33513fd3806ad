"""Lets setuptools install the repository root's cli.py as ``compress.entry.cli`` (see pyproject.toml):
every installed import name stays under ``compress``. Nothing else here is part of the package."""
