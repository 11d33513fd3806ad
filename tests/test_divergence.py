"""A diverging training run stops with advice that works: lower ``lr`` and ``--resume``.

The loss of step s comes from the weights after step s - 1, so a checkpoint of step s - 1 already
holds the divergence; the one before it is kept beside the latest and becomes the checkpoint the
message names. A resumed run takes the recipe's new rates (the optimizer keeps its moments) and says
so in the log; the mid-training checkpoints are named without the rates, so changing ``lr`` does
not start training over.

- The loop itself, on a toy model whose loss turns nan once its one weight passes a threshold (the
  weight climbs by about ``lr`` times the schedule per Adam step): nan at step 5, step 3's checkpoint kept (step 4's
  gave the nan), resumed with a tenth of the rate from step 3 to the end.
- The CLI: a rate of 1e30 (nan at step 2, nothing good kept: it says so), then the same recipe with
  a sane rate and ``--resume``: finishes.
- The CLI: a run killed after its second checkpoint, resumed with half the rate: continues at step 4
  and logs the change.
"""

import logging
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli, tiny_recipe
from torch import nn

from compress.training.loop import STATE_FILE, NonFiniteLoss, TrainSettings, train


class Climber(nn.Module):
    """A 'language model' whose loss pulls its one weight up, and is nan past ``limit``."""

    def __init__(self, limit: float):
        super().__init__()
        self.embed = nn.Embedding(8, 1)
        self.weight = nn.Parameter(torch.zeros(()))
        self.limit = limit

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels=None, use_cache=False):
        loss = (self.weight - 100.0) ** 2
        if float(self.weight.detach()) > self.limit:
            loss = loss * float("nan")
        return type("Output", (), {"loss": loss})()


def settings(lr: float) -> TrainSettings:
    return TrainSettings(steps=8, lr=lr, batch_size=1, warmup=0.0, max_grad_norm=0.0, save_every=1)


def test_the_checkpoint_before_the_divergence_is_kept_and_resumes_with_a_new_rate(tmp_path, caplog):
    from compress.training.loop import previous_file

    model = Climber(limit=3.2)  # cosine-decayed unit steps: 2.81 after 3 steps, 3.50 after 4
    params = {"weight": model.weight}
    windows = torch.zeros(4, 4, dtype=torch.long)
    with pytest.raises(NonFiniteLoss) as failed:
        train(model, params, windows, settings(1.0), state_dir=tmp_path)
    assert "training loss is nan at step 5" in str(failed.value)
    assert "the last good training checkpoint (step 3) is kept" in str(failed.value)
    assert "continues from step 3 with the new rate" in str(failed.value)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    assert state["step"] == 3 and float(state["params"]["weight"]) < 3.2
    assert not previous_file(tmp_path / STATE_FILE).exists()
    with caplog.at_level(logging.INFO, logger="compress.training.loop"):
        result = train(model, params, windows, settings(0.1), state_dir=tmp_path, resume=True)
    assert result.resumed_from == 3 and len(result.losses) == 8
    assert float(model.weight.detach()) < 3.2
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "group 0 lr 1 -> 0.1" in messages and "resuming training at step 3 of 8" in messages


def test_without_a_good_checkpoint_the_advice_is_to_run_again(tmp_path):
    from compress.training.loop import previous_file

    model = Climber(limit=0.5)  # nan at step 2: step 1's checkpoint is the divergence
    with pytest.raises(NonFiniteLoss, match="no training checkpoint from before it was kept"):
        train(model, {"weight": model.weight}, torch.zeros(4, 4, dtype=torch.long), settings(1.0), state_dir=tmp_path)
    assert not (tmp_path / STATE_FILE).exists() and not previous_file(tmp_path / STATE_FILE).exists()


FINETUNE = ("  - quantize: {{config: {{bits: 4, group_size: 64}}}}\n"
            "  - finetune: {{steps: 8, save_every: {save}, lr: {lr}, max_grad_norm: 0, warmup: 0, batch_size: 2, "
            "seq_len: 32, lora: {{rank: 4}}}}")


def test_a_diverged_run_advises_what_works_and_resume_finishes(tmp_path):
    path = tiny_recipe(tmp_path, FINETUNE.format(save=1, lr="1.0e+30"))
    result = run_cli("run", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.search(r"stages\[1\]\.finetune: training loss is (nan|inf) at step 2; no training checkpoint from "
                     r"before it was kept: lower lr in the recipe and run it again", result.stderr), result.stderr
    assert not list((tmp_path / "out" / ".cache" / "train").glob("*/train_state*.pt"))
    tiny_recipe(tmp_path, FINETUNE.format(save=1, lr="1.0e-3"))
    resumed = run_cli("run", path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after stage 0 (quantize)" in resumed.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_with_a_changed_rate_from_its_checkpoint(tmp_path):
    path = tiny_recipe(tmp_path, FINETUNE.format(save=2, lr="1.0e-3"))
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "tools" / "crash_after_saves.py"), "2", "run",
                             str(path)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    tiny_recipe(tmp_path, FINETUNE.format(save=2, lr="5.0e-4"))
    resumed = run_cli("run", path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming training at step 4 of 8" in resumed.stderr, resumed.stderr[-3000:]
    assert "group 0 lr 0.001 -> 0.0005" in resumed.stderr, resumed.stderr[-3000:]


def keys_for(train_lr: float, align_lr: float) -> dict[str, str]:
    """training_key of LoRAM's training phase and of a finetune stage for one recipe."""
    from types import SimpleNamespace

    from compress.run.recipe import parse_recipe
    from compress.stages.training_common import training_key

    recipe = parse_recipe({"model": "tiny-llama", "output": "out", "stages": [
        {"loram": {"align_steps": 2, "align_lr": align_lr, "train": {"lr": train_lr, "lora": {"rank": 4}}}},
        {"finetune": {"lr": train_lr}}]})
    loram, finetune = recipe.stages
    return {"loram-train": training_key(SimpleNamespace(entry=loram, recipe=recipe), loram.config.train),
            "finetune": training_key(SimpleNamespace(entry=finetune, recipe=recipe), finetune.config)}


def test_a_phase_resumes_across_its_own_rate_but_not_an_earlier_phases():
    base = keys_for(1e-4, 5e-5)
    assert keys_for(5e-5, 5e-5)["loram-train"] == base["loram-train"]  # its own lr: resumable
    assert keys_for(1e-4, 5e-2)["loram-train"] != base["loram-train"]  # alignment changed: the small model did
    assert keys_for(1e-4, 5e-2)["finetune"] != base["finetune"]  # an earlier stage changed


def test_a_crash_between_the_two_writes_resumes_from_the_previous_file(tmp_path):
    from compress.training.loop import previous_file

    model = Climber(limit=1e9)
    params, windows = {"weight": model.weight}, torch.zeros(4, 4, dtype=torch.long)
    short = TrainSettings(steps=3, lr=1.0, batch_size=1, warmup=0.0, max_grad_norm=0.0, save_every=1)
    train(model, params, windows, short, state_dir=tmp_path)  # saves steps 1 and 2 (not the last)
    latest = tmp_path / STATE_FILE
    assert torch.load(previous_file(latest), weights_only=True)["step"] == 1
    latest.unlink()  # as a crash right after the latest moved aside leaves it
    fresh = Climber(limit=1e9)
    result = train(fresh, {"weight": fresh.weight}, windows, short, state_dir=tmp_path, resume=True)
    assert result.resumed_from == 1 and latest.is_file() and len(result.losses) == 3
