"""Run the ``compress`` CLI in this process and write its memory use as JSON.

    python tests/tools/peak_rss.py OUT.json run recipe.yaml ...

``baseline_mib``: RSS once torch, transformers' Llama and every compress stage are imported (what any
run holds before touching a model); ``peak_mib``: the process's peak RSS (``ru_maxrss``, exact, not
sampled) after the command; ``exit_code``: the CLI's."""

import json
import resource
import sys

import psutil


def main() -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported by any run; not the model)

    import compress.pipeline  # noqa: F401
    import compress.stages  # noqa: F401
    from compress.entry import cli

    baseline = psutil.Process().memory_info().rss / 2**20
    code = cli.main(sys.argv[2:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(sys.argv[1], "w") as handle:
        json.dump({"baseline_mib": baseline, "peak_mib": peak, "exit_code": code}, handle)
    sys.exit(code)


if __name__ == "__main__":
    main()
