"""The interface through which pruning joins a training loop, with no-op defaults.

A training loop (``compress.training.loop.train``) calls ``after_backward(step)`` once a step's gradients
are accumulated and clipped, before the optimizer step, and ``after_step(step)`` after it (``step``
counts from 1); ``state_dict()`` travels in its mid-training checkpoint and ``load_state_dict(state)``
restores it on resume. The loop accepts any object with these four methods; the pruning hooks
(``PruningHooks``, ``KeepSparse``) subclass ``StepHooks`` for the defaults of those they leave out.
"""

from __future__ import annotations


class StepHooks:
    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
