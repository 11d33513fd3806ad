"""Where and how work runs: the unit walker (resident or streamed), layer-by-layer calibration,
the one replace_layers walk, device placement, memory peaks, processes and ranks, perplexity by units."""
