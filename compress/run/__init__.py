"""A run: the recipe, its checks, the pipeline that drives the stages, resume state, lock, progress.
Top of the import graph: imports stages/ and everything below; only the facade and cli.py import run/."""
