"""Everything that runs a backward pass: the training loop, distillation, per-sample Fisher.
Used by the training stages; imports execution/, models/ and the libraries."""
