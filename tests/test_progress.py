"""Long work says where it is when nobody watches a terminal: with stderr going to a file, a stage
logs one line at most every 30 s (the loops in progress with i/n, elapsed, ETA). The clock is
injected, so nothing here depends on how fast the machine is."""

import io
import logging
import os
import subprocess
import sys

from conftest import tiny_recipe
from rich.console import Console

from compress.run.progress import ProgressBars


def logged_lines(caplog, interval: float, outer: int, inner: int, step: float) -> list[str]:
    now = [0.0]
    bars = ProgressBars(Console(file=io.StringIO()), enabled=True, interval=interval, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="compress.run.progress"), bars.session():
        for _ in bars.track(range(outer), "stages"):
            for _ in bars.track(range(inner), "gptq layers"):
                now[0] += step
    return [r.getMessage() for r in caplog.records if r.name == "compress.run.progress"]


def test_a_line_at_most_every_interval_with_position_and_eta(caplog):
    lines = logged_lines(caplog, interval=30, outer=2, inner=10, step=7)  # 140 s of work
    assert lines[0] == "progress: stages 1/2 > gptq layers 5/10 (35s elapsed, ETA 35s)"
    assert len(lines) == 4  # every 35 s: each line waits for 30 s to have passed
    assert lines[-1] == "progress: stages 2/2 > gptq layers 10/10 (1m10s elapsed)"


def test_fast_work_logs_nothing(caplog):
    assert logged_lines(caplog, interval=30, outer=3, inner=5, step=1) == []


def test_a_terminal_gets_bars_and_no_lines(caplog):
    console = Console(file=io.StringIO(), force_terminal=True)
    bars = ProgressBars(console, enabled=True, interval=0)
    with caplog.at_level(logging.INFO, logger="compress.run.progress"), bars.session():
        assert list(bars.track(range(3), "x")) == [0, 1, 2]
    assert not [r for r in caplog.records if r.name == "compress.run.progress"]


def test_quiet_logs_nothing(caplog):
    bars = ProgressBars(Console(file=io.StringIO()), enabled=False, interval=0)
    with caplog.at_level(logging.INFO, logger="compress.run.progress"), bars.session():
        assert list(bars.track(range(3), "x")) == [0, 1, 2]
    assert not [r for r in caplog.records if r.name == "compress.run.progress"]


def test_a_run_with_stderr_to_a_file_logs_progress(tmp_path):
    path = tiny_recipe(tmp_path, "  - quantize: {method: gptq, config: {bits: 4, group_size: 64}}\n  - eval: {}")
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "compress.entry.cli", "run", str(path)], stdout=subprocess.DEVNULL,
                              stderr=stderr, env={**os.environ, "COMPRESS_PROGRESS_SECONDS": "0"}, timeout=600)
    text = log_file.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "progress: stages 1/2 > gptq units 1/7" in text, text[-3000:]
    assert "progress: stages 2/2 > perplexity" in text, text[-3000:]
