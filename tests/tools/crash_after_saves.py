"""Run the ``compress`` CLI and SIGKILL the process right after its N-th mid-training checkpoint write.

    python tests/tools/crash_after_saves.py N run recipe.yaml ...

A fault injector for resume tests: the training code runs unchanged; only the moment of death is
chosen, so the state on disk is exactly what a crash at that point leaves."""

import os
import signal
import sys


def main() -> None:
    limit = int(sys.argv[1])
    from compress.training import loop as training
    from compress.entry import cli

    original, calls = training._save_state, []  # (path, step, params, optimizer, result, hooks)

    def save_then_maybe_die(*args, **kwargs):
        original(*args, **kwargs)
        calls.append(1)
        if len(calls) >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    training._save_state = save_then_maybe_die
    sys.exit(cli.main(sys.argv[2:]))


if __name__ == "__main__":
    main()
