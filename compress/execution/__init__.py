"""Where and how work runs: the unit walker (resident or streamed), layer-by-layer calibration,
device placement, memory peaks, processes and ranks, perplexity by units."""
