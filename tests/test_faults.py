"""Faults: a run killed anywhere resumes to the same files; a full disk and a diverging training run
stop with one line and keep what was already saved.

- SIGKILL at 5 seeded random moments of a 4-stage run (quantize, finetune with mid-training
  checkpoints, two exports), each followed by ``--resume``: the exported files are byte-identical to
  an uninterrupted run's.
- A file size limit (``RLIMIT_FSIZE``: writes past it fail with EFBIG, as on a full disk) that the
  quantize stage's state fits under and the dense export does not: exit 2 with one line naming the
  stage and the file, the quantize stage's saved state intact and loadable, no partial checkpoint or
  staging directory left; ``--resume`` without the limit then finishes with the uninterrupted files.
- A diverging training run: tests/test_divergence.py.
"""

import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
from conftest import file_hashes, run_cli, tiny_recipe

import compress

STAGES = """  - quantize: {config: {bits: 4, group_size: 64}}
  - finetune: {steps: 8, save_every: 2, batch_size: 2, seq_len: 32, lora: {rank: 4}}
  - export: {format: native, adapters: embed}
  - export: {format: gptq, path: gptq}"""


def outputs(out):
    return {name: file_hashes(out / name) for name in ("checkpoint", "gptq", "gptq-adapter")}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path):
    path = tiny_recipe(tmp_path, STAGES)
    out = tmp_path / "out"
    start = time.perf_counter()
    assert run_cli("run", path, "--quiet").returncode == 0
    duration = time.perf_counter() - start
    reference = outputs(out)
    for seed in range(5):
        delay = random.Random(seed).uniform(0.1, 0.95) * duration
        process = subprocess.Popen([sys.executable, "-m", "compress.entry.cli", "run", str(path), "--overwrite", "--quiet"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        resumed = run_cli("run", path, "--resume", "--quiet")
        assert resumed.returncode == 0, (seed, resumed.stderr[-2000:])
        assert outputs(out) == reference, f"seed {seed}: killed after {delay:.1f} s of {duration:.1f}"
        assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_full_disk_fails_cleanly_and_resume_finishes(tmp_path):
    stages = "  - quantize: {config: {bits: 4, group_size: 64}}\n  - export: {format: hf}"
    reference_dir = tmp_path / "reference"
    reference = tiny_recipe(reference_dir.parent, stages, output=reference_dir, name="reference.yaml")
    assert run_cli("run", reference, "--quiet").returncode == 0
    state_bytes = max(p.stat().st_size for p in (reference_dir / ".stages").rglob("*") if p.is_file())
    export_bytes = max(p.stat().st_size for p in (reference_dir / "checkpoint").rglob("*") if p.is_file())
    assert state_bytes < export_bytes
    path = tiny_recipe(tmp_path, stages)
    out = tmp_path / "out"
    full = subprocess.run([sys.executable, "-m", "compress.entry.cli", "run", str(path), "--quiet"],
                          capture_output=True, text=True, preexec_fn=_limit_file_size((state_bytes + export_bytes) // 2))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert [line.startswith("error:") for line in full.stderr.splitlines() if not line.startswith("INFO")] == [True]
    assert re.search(r"stages\[1\]\.export: .*\.safetensors.*File too large", full.stderr), full.stderr
    state = out / ".stages" / "00-quantize"
    assert (state / "state.json").is_file()
    compress.load(state / "model")  # intact: every file matches the manifest's sha256
    assert not (out / "checkpoint").exists() and not list(out.glob(".tmp-*"))
    resumed = run_cli("run", path, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, expected = file_hashes(out / "checkpoint"), file_hashes(reference_dir / "checkpoint")
    got.pop("compress.json"), expected.pop("compress.json")  # the manifest records the output path
    assert got == expected


def test_a_removal_killed_halfway_leaves_no_completed_state(tmp_path, monkeypatch):
    """``--overwrite`` removes the earlier run's states; killed while it deletes a state's model
    files (here: rmtree dies after the model), that state no longer counts as completed."""
    import shutil

    from compress.run import pipeline

    path = tiny_recipe(tmp_path, "  - quantize: {config: {bits: 4, group_size: 64}}")
    recipe = compress.load_recipe(path)
    compress.run_recipe(recipe)
    states = pipeline.StageStates(tmp_path / "out" / pipeline.STATE_DIR, recipe)
    assert [e.name for e in states.completed()] == ["quantize"]

    remove = shutil.rmtree

    def dies_after_the_model(directory, ignore_errors=False):
        remove(directory / "model")
        raise KeyboardInterrupt  # the kill, before state.json would have gone

    monkeypatch.setattr(pipeline.shutil, "rmtree", dies_after_the_model)
    with pytest.raises(KeyboardInterrupt):
        states.discard_after(0)
    assert states.completed() == []
