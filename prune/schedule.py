"""When to prune and how much: LoRAPrune's cubic sparsity ramp (Zhu & Gupta style).

    p(t) = p0                                        t <= w_i T
         = p_f                                       t >  T - w_f T
         = p_f + (p0 - p_f) (1 - (t - w_i T) / (T - (w_i + w_f) T))^3      otherwise

A pruning event happens every ``every`` steps while the ramp is rising, and one final event at the
first step of the cool-down lands exactly on ``p_f`` (the upstream condition p(t) < p_f stops just
short of the target).
"""

from __future__ import annotations


def cubic_ratio(step: int, total: int, final: float, initial: float = 0.0, warmup: float = 0.1,
                cooldown: float = 0.1) -> float:
    start, end = warmup * total, total - cooldown * total
    if step <= start:
        return initial
    if step > end:
        return final
    progress = (step - start) / max(end - start, 1e-12)
    return final + (initial - final) * (1.0 - progress) ** 3


def prune_events(total: int, every: int, final: float, initial: float = 0.0, warmup: float = 0.1,
                 cooldown: float = 0.1) -> dict[int, float]:
    """{step: ratio} of every pruning event of a run of ``total`` steps (steps count from 1)."""
    events = {}
    for step in range(1, total + 1):
        ratio = cubic_ratio(step, total, final, initial, warmup, cooldown)
        if step % every == 0 and initial < ratio < final:
            events[step] = ratio
    last_ramp = next((s for s in range(1, total + 1)
                      if cubic_ratio(s, total, final, initial, warmup, cooldown) >= final), total)
    events[last_ramp] = final  # the target, exactly
    return dict(sorted(events.items()))
