"""Memory plans from a model's config alone (no weights): storage, training memory, recipe plans.
Imports models/ and the libraries only; execution/ asks it whether a stage fits."""
