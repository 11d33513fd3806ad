"""Low-rank parts: LoRA wrapper, LQ-LoRA decomposition, Fisher estimation, ILP allocation.

Empty until the LQ-LoRA issue lands; the package exists so the import layout is fixed."""
