"""Structured pruning (LoRAPrune): units, importance criteria, schedules, masks, physical shrink.

Empty until the LoRAPrune issue lands; the package exists so the import layout is fixed."""
