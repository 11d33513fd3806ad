"""Run the ``compress`` CLI in this process and write its memory use as JSON.

    python tests/tools/peak_rss.py OUT.json run recipe.yaml ...

``baseline_mib``: RSS once torch, transformers' Llama and every compress stage are imported (what any
run holds before touching a model); ``peak_mib``: the process's peak RSS after the command, exact, not
sampled: the kernel's high-water mark of this process's memory (``VmHWM``). Not ``ru_maxrss``: Linux
carries that across ``exec`` from the parent's memory when the parent started us with ``vfork``, as
Python's ``subprocess`` does, so a child of a large pytest process would report the parent's peak.
``exit_code``: the CLI's."""

import json
import sys

import psutil


def high_water_mib() -> float:
    with open("/proc/self/status") as status:
        kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    return int(kib) / 1024


def main() -> None:
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported by any run; not the model)

    import compress.run.pipeline  # noqa: F401
    import compress.stages  # noqa: F401
    from compress.entry import cli

    baseline = psutil.Process().memory_info().rss / 2**20
    code = cli.main(sys.argv[2:])
    peak = high_water_mib()
    with open(sys.argv[1], "w") as handle:
        json.dump({"baseline_mib": baseline, "peak_mib": peak, "exit_code": code}, handle)
    sys.exit(code)


if __name__ == "__main__":
    main()
