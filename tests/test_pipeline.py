"""End to end on tiny-llama: run, reports, reload; resume after SIGKILL gives identical files; the
output lock; an earlier run's state is never silently overwritten."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import file_hashes, logits, run_cli, tiny_recipe

import compress
from compress.errors import CompressError
from compress.quant import QuantLinear
from compress.run.lock import output_lock

STAGES = """  - quantize: {config: {bits: 4, group_size: 64}, overrides: {"re:.*down_proj$": {bits: 8}}}
  - eval: {batch_size: 2}
  - export: {format: gptq}
  - export: {format: native, path: native}"""


@pytest.mark.slow
def test_run_end_to_end(tmp_path):
    recipe = compress.load_recipe(tiny_recipe(tmp_path, STAGES))
    result = compress.run_recipe(recipe)
    names = [r.name for r in result.reports]
    assert names == ["load", "quantize", "eval", "export", "export"]
    load, quantize, evaluation, gptq, native = result.reports
    # q, o 256x256; k, v 64x256; gate, up 768x256 at 4 + 16/64 + 4/64; down 256x768 at 8 + 16/64 + 8/64
    expected_bits = ((4.3125 * (2 * 256 * 256 + 2 * 64 * 256 + 2 * 768 * 256) + 8.375 * 768 * 256)
                     / (2 * 256 * 256 + 2 * 64 * 256 + 3 * 768 * 256))
    assert quantize.metrics["bits_per_param"] == pytest.approx(expected_bits)
    assert gptq.metrics["bits_per_param"] == pytest.approx(expected_bits)
    assert native.metrics["bits_per_param"] == pytest.approx(expected_bits)
    assert gptq.metrics["reload_max_abs_logit_diff"] == 0.0
    assert gptq.metrics["perplexity"] == evaluation.metrics["perplexity"]
    assert load.metrics["perplexity"] != evaluation.metrics["perplexity"]
    # every quantized layer of the eval ran through the dispatcher, which names its choice
    assert evaluation.metrics["kernel"] == ("triton" if torch.cuda.is_available() else "reference")
    assert "kernel" not in load.metrics  # the dense baseline has no quantized layers
    report = json.loads(result.report_json.read_text())
    assert [s["name"] for s in report["stages"]] == names
    assert "| 0 | quantize" in result.report_md.read_text()
    reloaded = compress.load(tmp_path / "out" / "checkpoint")
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert reloaded.model.layers[0].mlp.down_proj.config.bits == 8
    info = compress.inspect(tmp_path / "out" / "checkpoint")
    assert info["bits_per_param"] == pytest.approx(expected_bits)


def _wait_for(predicate, process, timeout=240):
    start = time.time()
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"run ended before the kill point: {process.stderr.read()}")
        if time.time() - start > timeout:
            raise AssertionError("kill point never reached")
        time.sleep(0.01)


KILL_POINTS = {
    # while stage 1 (eval) runs: stage 0 is saved, stage 1 is not
    "mid-eval": lambda out: (out / ".stages" / "00-quantize").is_dir(),
    # while the gptq export writes its files into a staging directory
    "mid-export": lambda out: any(out.glob(".tmp-checkpoint-*")),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_then_resume_gives_identical_files(tmp_path, point):
    stages = STAGES.replace("eval: {batch_size: 2}", "eval: {batch_size: 1}")
    path = tiny_recipe(tmp_path, stages)
    out = tmp_path / "out"
    assert run_cli("run", path, "--quiet").returncode == 0
    reference = {name: file_hashes(out / name) for name in ("checkpoint", "native")}
    shutil.rmtree(out / ".stages")  # so the kill points below can only be reached by the new run
    process = subprocess.Popen([sys.executable, "-m", "compress.entry.cli", "run", str(path), "--overwrite", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: KILL_POINTS[point](out), process)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    if point == "mid-eval":
        assert not (out / ".stages" / "01-eval").exists(), "the kill should land inside stage 1"

    refused = run_cli("run", path, "--quiet")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli("run", path, "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert {name: file_hashes(out / name) for name in ("checkpoint", "native")} == reference
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


@pytest.mark.slow
def test_resume_reruns_from_the_first_changed_stage(tmp_path):
    path = tiny_recipe(tmp_path, STAGES)
    compress.run_recipe(compress.load_recipe(path))
    changed = path.read_text().replace("batch_size: 2", "batch_size: 3")
    path.write_text(changed)
    result = compress.run_recipe(compress.load_recipe(path), resume=True)
    assert result.resumed_after == 0  # quantize unchanged and kept; eval changed: rerun from there
    assert [r.name for r in result.reports] == ["load", "quantize", "eval", "export", "export"]
    again = compress.run_recipe(compress.load_recipe(path), resume=True)
    assert again.resumed_after == 3  # everything done: nothing reruns


def test_lock_refuses_a_second_run(tmp_path):
    path = tiny_recipe(tmp_path, STAGES)
    with output_lock(tmp_path / "out"):
        result = run_cli("run", path, "--quiet")
    assert result.returncode == 2
    assert "another compress run" in result.stderr and "Traceback" not in result.stderr
    with output_lock(tmp_path / "out"):
        with pytest.raises(CompressError, match="another compress run"):
            compress.run_recipe(compress.load_recipe(path))


def test_in_memory_quantized_model_equals_reloaded(tmp_path, probe_ids):
    path = tiny_recipe(tmp_path, "  - quantize: {config: {type: nf, bits: 3, block: 32}}\n  - export: {format: native}")
    result = compress.run_recipe(compress.load_recipe(path))
    assert result.reports[-1].metrics["reload_max_abs_logit_diff"] == 0.0
    state = compress.load(tmp_path / "out" / ".stages" / "00-quantize" / "model")
    final = compress.load(tmp_path / "out" / "checkpoint")
    assert torch.equal(logits(state, probe_ids), logits(final, probe_ids))
