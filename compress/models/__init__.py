"""What a run works on: model sources (built-ins, GGUF, HF, ours), architectures, model cards,
synthetic checkpoints, text data and its specs, losses over the head's slices of positions."""
