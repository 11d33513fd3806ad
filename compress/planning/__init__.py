"""Memory plans from a model's config alone (no weights): storage, training memory, recipe plans.
Each stage's own rows come from its ``memory`` (stage_memory.py); execution/ asks whether a stage fits."""
