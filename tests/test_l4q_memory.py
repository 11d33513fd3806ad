"""L4Q on a half-precision model keeps its memory LoRA-like: autograd saves each layer's input and
frozen base weight W0 as they are (bf16, the weight itself), never an fp32 copy of W0; the
arithmetic is still fp32, so a bf16 layer equals the fp32 Function on its exactly upcast inputs."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from compress.lowrank.l4q import L4QLinear, L4QMatmul
from compress.targets import select_linears, set_module


def bf16_l4q_llama(seed: int = 0) -> tuple[LlamaForCausalLM, list[L4QLinear]]:
    """A tiny random bf16 Llama whose decoder linears are L4QLinear (4-bit, group 32, rank 4) with a
    nonzero B, everything else frozen; and its L4Q layers."""
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, head_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for name, linear in select_linears(model, ["Linear"], ["lm_head"]):
        layer = L4QLinear(linear, rank=4, alpha=8, bits=4, group_size=32, generator=generator)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.02, generator=generator)  # a trained-looking update: dA != 0
        set_module(model, name, layer)
        layers.append(layer)
    return model, layers


def saved_records(model, ids: torch.Tensor) -> tuple[list[tuple], torch.Tensor]:
    """(dtype, shape, storage pointer, storage bytes) of every tensor autograd saves in one forward
    of ``model`` on ``ids``, and the loss (graph alive, for a backward)."""
    records = []

    def pack(tensor):
        storage = tensor.untyped_storage()
        records.append((tensor.dtype, tuple(tensor.shape), storage.data_ptr(), storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    return records, loss


def activation_bytes(records: list[tuple], model) -> int:
    """Bytes of the distinct saved storages that are not the model's parameters."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(dict((ptr, size) for _, _, ptr, size in records if ptr not in weights).values())


@pytest.fixture(scope="module")
def traced():
    """The tiny bf16 L4Q Llama, its L4Q layers, the saved-tensor records of one forward, its loss."""
    model, layers = bf16_l4q_llama()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    records, loss = saved_records(model, ids)
    return model, layers, records, loss


def test_no_fp32_copy_of_a_base_weight_is_saved(traced):
    model, layers, records, _ = traced
    shapes = {tuple(layer.base_layer.weight.shape) for layer in layers}
    fp32_weight_bytes = sum(size for dtype, shape, _, size in records if dtype == torch.float32 and shape in shapes)
    assert fp32_weight_bytes == 0  # the old forward saved 4 * |W0| per layer here: 288 KiB
    bases = {layer.base_layer.weight.untyped_storage().data_ptr() for layer in layers}
    weight_shaped = [(dtype, ptr) for dtype, shape, ptr, _ in records if shape in shapes]
    assert weight_shaped and all(dtype == torch.bfloat16 and ptr in bases for dtype, ptr in weight_shaped)
    assert bases <= {ptr for _, ptr in weight_shaped}, "every W0 saved is the layer's own bf16 weight"


def test_saved_activations_stay_below_one_fp32_copy_of_the_weights(traced):
    """The old code's fp32 copies of W0 alone (4 bytes per base weight, 288 KiB) exceed everything
    saved now beyond the parameters (bf16 inputs, the model's own fp32 norms...: 171 KiB; the old
    code saved 555 KiB)."""
    model, layers, records, _ = traced
    old_weight_copies = sum(4 * layer.base_layer.weight.numel() for layer in layers)
    assert activation_bytes(records, model) < old_weight_copies


def test_backward_gives_finite_fp32_gradients(traced):
    model, layers, _, loss = traced
    loss.backward()
    for layer in layers:
        for param in (layer.lora_A.weight, layer.lora_B.weight, layer.step, layer.offset):
            assert param.grad is not None and param.grad.dtype == torch.float32
            assert torch.isfinite(param.grad).all()
        assert layer.lora_A.weight.grad.abs().max() > 0 and layer.step.grad.abs().max() > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_layer_equals_fp32_function_on_upcast_inputs(dtype):
    """The arithmetic is fp32 whatever x's and W0's dtype: output, grad x (both rounded to x's
    dtype) and every trainable gradient equal, bit for bit, the fp32 Function on the same x, W0,
    bias and grad_y upcast exactly to fp32."""
    torch.manual_seed(0)
    base = torch.nn.Linear(96, 40).to(dtype)
    layer = L4QLinear(base, rank=4, alpha=8, bits=3, group_size=32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.05)
    x = torch.randn(3, 7, 96).to(dtype).requires_grad_()
    grad_y = torch.randn(3, 7, 40).to(dtype)
    y = layer(x)
    y.backward(grad_y)

    x32 = x.detach().float().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in
              (layer.lora_A.weight, layer.lora_B.weight, layer.step, layer.offset)]
    y32 = L4QMatmul.apply(x32, base.weight.float(), *params, layer.scaling, 32, 8, layer.grad_scale)
    y32 = y32 + base.bias.float()
    y32.backward(grad_y.float())
    assert y.dtype == dtype and torch.equal(y, y32.to(dtype))
    assert x.grad.dtype == dtype and torch.equal(x.grad, x32.grad.to(dtype))
    ours = (layer.lora_A.weight.grad, layer.lora_B.weight.grad, layer.step.grad, layer.offset.grad)
    for name, mine, reference in zip(("A", "B", "step", "offset"), ours, params):
        assert mine.dtype == torch.float32 and torch.equal(mine, reference.grad), f"gradient of {name}"
