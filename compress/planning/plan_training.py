"""Training memory from a model's config alone, per kind of training stage.

Parts (bytes): ``frozen_base`` (16-bit, fp32 or packed weights and the dense embeddings/norms),
``trainable`` (adapters in fp32, L4Q's step/offset, or every weight), ``gradients``, ``optimizer``
(AdamW: two fp32 moments, 8 bytes per parameter; 8-bit AdamW: 2), ``activations`` (what autograd
keeps for the backward pass), and ``transient`` (the largest short-lived temporaries).

Activations per token, in the compute dtype, for a Llama decoder layer with adapters on all seven
projections (transformers' SDPA attention, RMSNorm, SiLU MLP), counted from the tensors autograd
saves (tests/test_plan_training.py checks this against ``saved_tensors_hooks`` on real models):

    layer: 4 h     two norm inputs and the two normed inputs the projections read
           + 2 q   query and the attention output (o_proj reads a view of it)
           + 2 kv  key and value
           + H     log-sum-exp per head
           + 4 I   gate output, its SiLU, up output, down_proj input
           + 7 r   each adapter's A output (none for L4Q, whose Function keeps only x)
           + 2     the norms' inverse RMS
    head:  2 h + 1 (final norm; the loss's checkpointed slices keep only views of its output)

The loss applies the head to slices of positions (``compress.models.chunked_loss``): while one slice's
backward runs, its recomputed logits, their fp32 copy, log-softmax and gradient are alive, V * (dtype
+ 12) bytes per position of the slice, at most ``LOGIT_CHUNK_BYTES`` of fp32 logits a slice. With gradient checkpointing a layer keeps only
its input (h per token) and one layer's activations exist at a time, during recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from compress.quant import QuantConfig

from ..models.chunked_loss import positions_per_chunk
from .plan import Architecture, adapter_params

OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}
METHODS = ("lora", "qlora", "l4q", "prune", "loram", "full")


@dataclass(frozen=True)
class TrainingSetup:
    """What one training stage holds. ``base``: the frozen weights' packed config (QLoRA, finetune over
    a quantized model, QLoRAM) or None for ``base_bytes``-wide dense weights."""

    method: str = "lora"
    rank: int = 16
    batch: int = 1
    seq: int = 2048
    compute_bytes: int = 2
    base_bytes: int = 2
    base: QuantConfig | None = None
    base_bits: float | None = None  # a mixed-precision base (LQ-LoRA's budget): bits per projection weight
    optimizer: str = "adamw"
    checkpointing: bool = False
    l4q: QuantConfig = field(default_factory=lambda: QuantConfig.uniform(4, 64))
    prune_ratio: float = 0.0  # a pruned model (LoRAM's small one): uniform ratio on layers [prune_start, prune_end)
    prune_start: int = 0
    prune_end: int | None = None
    gradient_criterion: bool = False  # prune: the true-gradient criterion keeps dL/dW0
    distill_top_k: int = 0  # distillation (``compress.training.distill``): the teacher's top-k logits per token

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: not one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZER_BYTES:
            raise ValueError(f"optimizer {self.optimizer!r}: not one of {', '.join(OPTIMIZER_BYTES)}")


def layer_shape_list(arch: Architecture, setup: TrainingSetup) -> list[dict[str, tuple[int, int]]]:
    """The seven projection shapes of every layer, at LoRAM's pruned widths where it prunes."""
    import math

    end = arch.layers if setup.prune_end is None else setup.prune_end
    pruned = arch.layer_shapes(arch.kv_heads - math.floor(arch.kv_heads * setup.prune_ratio),
                               arch.intermediate - math.ceil(arch.intermediate * setup.prune_ratio))
    full = arch.layer_shapes()
    return [pruned if setup.prune_ratio > 0 and setup.prune_start <= i < end else full for i in range(arch.layers)]


def _layer_activation_values(shapes: dict[str, tuple[int, int]], arch: Architecture, rank: int) -> int:
    """Values autograd keeps per token for one layer (see the module docstring)."""
    q_width, kv_width, inter = shapes["q_proj"][0], shapes["k_proj"][0], shapes["gate_proj"][0]
    heads = q_width // arch.head_dim
    return 4 * arch.hidden + 2 * q_width + 2 * kv_width + heads + 4 * inter + 7 * rank + 2


def saved_activation_bytes(arch: Architecture, setup: TrainingSetup, layers: list[dict] | None = None) -> float:
    """What autograd keeps for ``batch x seq`` tokens (the log-softmax in fp32, as the loss upcasts)."""
    layers = layers or layer_shape_list(arch, setup)
    rank = 0 if setup.method in ("l4q", "full") else setup.rank
    per_layer = [_layer_activation_values(shapes, arch, rank) for shapes in layers]
    kept = len(layers) * arch.hidden + max(per_layer) if setup.checkpointing else sum(per_layer)
    return setup.batch * setup.seq * (kept + 2 * arch.hidden + 1) * setup.compute_bytes


def activation_bytes(arch: Architecture, setup: TrainingSetup, layers: list[dict] | None = None) -> float:
    """Saved activations plus the loss's peak over one slice of positions (module docstring); with
    distillation the tempered log-softmax and its gradient (two more fp32 V-wide tensors per position
    of the slice) and the micro-batch's teacher targets (fp32 value + int32 index per top-k entry,
    fp32 tail mass)."""
    tokens = setup.batch * min(setup.seq, positions_per_chunk(setup.batch, arch.vocab))
    extra = tokens * arch.vocab * (setup.compute_bytes + 12)
    if setup.distill_top_k:
        extra += tokens * 8 * arch.vocab + setup.batch * setup.seq * (8 * setup.distill_top_k + 4)
    return saved_activation_bytes(arch, setup, layers) + extra


def _frozen_base(arch: Architecture, setup: TrainingSetup, layers: list[dict]) -> float:
    dense = sum(arch.dense_params().values()) * setup.base_bytes
    if setup.method == "full":
        return 0.0
    linear = 0.0
    for shapes in layers:
        for shape in shapes.values():
            if setup.base_bits is not None:
                linear += shape[0] * shape[1] * setup.base_bits / 8
            elif setup.base is None:
                linear += shape[0] * shape[1] * setup.base_bytes
            else:
                linear += setup.base.storage_bits(shape) / 8
    return dense + linear


def _trainable_params(arch: Architecture, setup: TrainingSetup, layers: list[dict]) -> int:
    if setup.method == "full":
        return sum(o * i for shapes in layers for o, i in shapes.values()) + sum(arch.dense_params().values())
    params = sum(adapter_params(shapes, setup.rank) for shapes in layers)
    if setup.method == "l4q":
        params += sum(2 * o * setup.l4q.groups(i) for shapes in layers for o, i in shapes.values())
    return params


def _transient(arch: Architecture, setup: TrainingSetup, layers: list[dict]) -> float:
    """The largest short-lived temporaries: L4Q's backward recomputes about 8 fp32 copies of its
    largest matrix; pruning scores one matrix at a time (about 6 copies); a packed base is
    dequantized one layer at a time."""
    largest = max(o * i for shapes in layers for o, i in shapes.values())
    if setup.method == "l4q":
        return 8 * 4 * largest
    if setup.method == "prune":
        return 6 * 4 * largest
    if setup.base is not None or setup.base_bits is not None:
        return 2 * setup.compute_bytes * largest
    return 0.0


def training_breakdown(arch: Architecture, setup: TrainingSetup) -> dict[str, float]:
    """Bytes by part of one training stage (see the module docstring)."""
    layers = layer_shape_list(arch, setup)
    trainable = _trainable_params(arch, setup, layers)
    width = setup.base_bytes if setup.method == "full" else 4  # adapters and quant params train in fp32
    gradients = trainable * width
    if setup.method == "prune" and setup.gradient_criterion:
        gradients += sum(o * i for shapes in layers for o, i in shapes.values()) * setup.base_bytes
    return {"frozen_base": _frozen_base(arch, setup, layers), "trainable": trainable * width,
            "gradients": float(gradients), "optimizer": trainable * OPTIMIZER_BYTES[setup.optimizer],
            "activations": activation_bytes(arch, setup, layers), "transient": _transient(arch, setup, layers)}


NF4_DQ = QuantConfig.nf(4, block=64, scale_bits=8, scale_block=256, scale_dtype="float32")
# Training candidates, best expected quality first: (name, setup changes). LoRAM's pruned range
# follows the paper's LLaMA-3.1-70B setting scaled to the depth: the first 5 % and last 4 % whole.
TRAINING_CANDIDATES = [("lora", {}), ("qlora", {"method": "qlora", "base": NF4_DQ})] + [
    (f"qloram-{ratio:g}", {"method": "loram", "base": NF4_DQ, "prune_ratio": ratio}) for ratio in (0.5, 0.65, 0.85)]


def candidate_setup(arch: Architecture, name: str, base: TrainingSetup) -> TrainingSetup:
    changes = dict(next(c for n, c in TRAINING_CANDIDATES if n == name))
    if changes.get("method") == "loram":
        changes.update(prune_start=round(0.05 * arch.layers), prune_end=arch.layers - round(0.04 * arch.layers))
    return replace(base, **changes)


def best_training_fit(arch: Architecture, gpu_gib: float, base: TrainingSetup) -> str | None:
    """The first candidate (LoRA, QLoRA, then QLoRAM at growing pruning ratios) that fits ``gpu_gib``."""
    for name, _ in TRAINING_CANDIDATES:
        if sum(training_breakdown(arch, candidate_setup(arch, name, base)).values()) <= gpu_gib * (1 << 30):
            return name
    return None
