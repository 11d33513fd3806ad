"""Distillation (``compress.training.distill``, issue 23): the loss against a float64 reference, the teacher
as its own minimum, the tail mass, the teacher's cached top-k targets, a finetune that moves the
student toward the unquantized model, the plan's extra memory, and prune refusing it."""

import pytest
import torch
import torch.nn.functional as F

import compress
from compress.training.distill import distill_loss, log_tail_mass, top_log_probs, top_logits
from conftest import run_cli, tiny_recipe

GEN = torch.Generator().manual_seed(5)


def reference_loss(student, windows, teacher, k, weight, temperature) -> float:
    """float64, position by position: CE of the next token, KL over the teacher's top k plus one
    outcome for every other token."""
    student, teacher = student.double(), teacher.double()
    ce, count = 0.0, 0
    for b in range(windows.shape[0]):
        for t in range(windows.shape[1] - 1):
            ce -= float(torch.log_softmax(student[b, t], -1)[windows[b, t + 1]])
            count += 1
    kl, positions = 0.0, 0
    for b in range(windows.shape[0]):
        for t in range(windows.shape[1]):
            top = torch.topk(teacher[b, t], k).indices
            p_all = torch.softmax(teacher[b, t] / temperature, -1)
            q_all = torch.softmax(student[b, t] / temperature, -1)
            p = torch.cat([p_all[top], (1 - p_all[top].sum()).clamp(min=0).view(1)])
            q = torch.cat([q_all[top], (1 - q_all[top].sum()).clamp(min=1e-300).view(1)])
            kl += float(torch.where(p > 0, p * (p.clamp(min=1e-300).log() - q.log()), 0.0).sum())
            positions += 1
    return (1 - weight) * ce / count + weight * temperature**2 * kl / positions


def targets(teacher: torch.Tensor, k: int, temperature: float):
    """(values, indices, tail) as the teacher's cache holds them."""
    values, indices = top_logits(teacher, k)
    return values, indices, log_tail_mass(top_log_probs(teacher, indices, temperature)).float()


@pytest.mark.parametrize("k, weight, temperature", [(5, 0.5, 2.0), (40, 1.0, 1.0), (3, 0.0, 3.0), (12, 1.0, 0.5)])
def test_distill_loss_matches_the_float64_reference(k, weight, temperature):
    student, teacher = torch.randn(2, 6, 40, generator=GEN), torch.randn(2, 6, 40, generator=GEN) * 2
    windows = torch.randint(0, 40, (2, 6), generator=GEN)
    ours = float(distill_loss(student, windows, *targets(teacher, k, temperature), weight, temperature))
    assert ours == pytest.approx(reference_loss(student, windows, teacher, k, weight, temperature), rel=1e-5)


def test_teacher_tail_mass_matches_float64():
    teacher = torch.randn(3, 5, 200, generator=GEN) * 3
    _, indices, tail = targets(teacher, 16, 2.0)
    expected = 1 - torch.softmax(teacher.double() / 2.0, -1).gather(-1, indices).sum(-1)
    assert torch.allclose(tail.double().exp(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [4, 30])
def test_the_teacher_itself_has_zero_loss_and_zero_gradient(k):
    """The teacher is the minimum: with a top k below the vocabulary the tail outcome carries the
    rest of its mass (renormalizing over the top k alone gave the teacher a loss of -T² log(top-k
    mass) and a gradient that sharpens it)."""
    teacher = torch.randn(2, 4, 30, generator=GEN) * 2
    logits = teacher.clone().requires_grad_(True)
    windows = torch.randint(0, 30, (2, 4), generator=GEN)
    loss = distill_loss(logits, windows, *targets(teacher, k, 2.0), 1.0, 2.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(logits.grad.abs().max()) < 1e-6


def test_coarse_kl_never_exceeds_the_full_kl():
    teacher, student = torch.randn(4, 8, 50, generator=GEN) * 2, torch.randn(4, 8, 50, generator=GEN) * 2
    windows = torch.randint(0, 50, (4, 8), generator=GEN)
    p, q = F.log_softmax(teacher.double() / 2, -1), F.log_softmax(student.double() / 2, -1)
    full = float((p.exp() * (p - q)).sum(-1).mean())
    for k in (1, 8, 49):
        coarse = float(distill_loss(student, windows, *targets(teacher, k, 2.0), 1.0, 2.0)) / 4
        assert 0 <= coarse <= full + 1e-6, (k, coarse, full)
    assert float(distill_loss(student, windows, *targets(teacher, 50, 2.0), 1.0, 2.0)) / 4 == pytest.approx(full, rel=1e-5)


def kl_to(model, teacher, windows) -> float:
    with torch.no_grad():
        p = F.log_softmax(teacher(input_ids=windows).logits.double(), -1)
        q = F.log_softmax(model(input_ids=windows).logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.mark.slow
def test_finetune_with_distillation_moves_the_student_toward_the_teacher(tmp_path, tiny_pair):
    """int2 RTN base + LoRA, 12 steps: with distill weight 1 the KL to the float model on held-out
    windows falls further than with the next-token loss alone; the teacher's targets are cached."""
    from test_gptq_stage import held_out_text

    text = held_out_text(tiny_pair[1])
    kls = {}
    for name, distill in (("plain", ""), ("distill", ", distill: {weight: 1.0, temperature: 1.0, top_k: 32}")):
        stages = ("  - quantize: {method: rtn, config: {bits: 2, group_size: 32}}\n"
                  f"  - finetune: {{steps: 12, lr: 1.0e-3, batch_size: 2, grad_accum: 1, seq_len: 64, save_every: 0, "
                  f"lora: {{rank: 8, alpha: 16}}{distill}}}\n"
                  "  - export: {format: native, adapters: embed}")
        (tmp_path / name).mkdir()
        result = compress.run_recipe(compress.load_recipe(tiny_recipe(tmp_path / name, stages)))
        kls[name] = kl_to(compress.load(result.out_dir / "checkpoint", dtype="float32"), tiny_pair[0], text)
    assert list((tmp_path / "distill" / "out" / ".cache" / "distill").glob("*.safetensors"))
    assert kls["distill"] < kls["plain"], kls


def test_plan_counts_the_distillation_tensors():
    from compress.planning.plan import Architecture
    from compress.planning.plan_training import TrainingSetup, activation_bytes

    arch = Architecture.from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000})
    plain = activation_bytes(arch, TrainingSetup(batch=2, seq=16))
    distilled = activation_bytes(arch, TrainingSetup(batch=2, seq=16, distill_top_k=64))
    assert distilled - plain == 2 * 16 * (8 * 1000 + 8 * 64 + 4)


def test_prune_refuses_distill(tmp_path):
    stages = "  - prune: {ratio: 0.2, steps: 4, distill: {weight: 0.5}}"
    done = run_cli("run", str(tiny_recipe(tmp_path, stages)))
    assert done.returncode == 2 and "distill: only for finetune, l4q and loram" in done.stderr
