"""Nothing outside a run's ``output`` is ever replaced, and inside it only what compress wrote.

Export paths that leave ``output`` (absolute, ``..``, a symbolic link out), that are ``output`` itself
or land on the run's own entries (``.stages``, ``.lock``, ``.cache``, the reports), that overlap
another export's, or that hold something we did not write are refused by ``compress validate`` and
by ``compress run`` with one line and exit 2, before any weight is loaded; a sentinel directory
with a file in it is checked to be untouched after every case. Unusable outputs (an existing file,
an unwritable folder, a name longer than the file system allows) are refused the same way.
"""

import contextlib
import io
import os

import pytest
import yaml
from conftest import file_hashes

from compress.entry import cli
from compress.errors import CheckpointError


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


def recipe_file(tmp_path, export: dict, output=None, stages_before=(), extra_exports=()) -> str:
    stages = [*stages_before, {"quantize": {"config": {"bits": 4, "group_size": 64}}}, {"export": export},
              *({"export": e} for e in extra_exports)]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "stages": stages,
                                    "output": str(output or tmp_path / "out")}))
    return str(path)


@pytest.fixture
def sentinel(tmp_path):
    """A user's directory beside the output, with a file in it."""
    directory = tmp_path / "precious"
    directory.mkdir()
    (directory / "thesis.txt").write_text("years of work\n")
    return directory


def refused(tmp_path, recipe, sentinel, pattern: str) -> None:
    before = file_hashes(sentinel)
    for command in ("validate", "run"):
        code, stderr = run(command, recipe, "--quiet") if command == "run" else run(command, recipe)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (command, stderr)
        assert pattern in lines[0], lines[0]
        assert "Traceback" not in stderr
        assert file_hashes(sentinel) == before and sentinel.is_dir()


@pytest.mark.parametrize("key", ["path", "adapter_path"])
def test_an_absolute_export_path_is_refused(tmp_path, sentinel, key):
    export = {"format": "native", key: str(sentinel)}
    refused(tmp_path, recipe_file(tmp_path, export), sentinel, "is not relative")


@pytest.mark.parametrize("key", ["path", "adapter_path"])
def test_a_path_that_climbs_out_of_output_is_refused(tmp_path, sentinel, key):
    export = {"format": "native", key: "../precious"}
    refused(tmp_path, recipe_file(tmp_path, export), sentinel, "leaves output")


def test_a_symbolic_link_out_of_output_is_refused(tmp_path, sentinel):
    (tmp_path / "out").mkdir()
    os.symlink(sentinel, tmp_path / "out" / "checkpoint")
    refused(tmp_path, recipe_file(tmp_path, {"format": "native"}), sentinel, "outside output")


@pytest.mark.parametrize("path, pattern", [(".", "is output itself"), ("./", "is output itself"),
                                           (".stages", "the run's own .stages"), (".lock", "the run's own .lock"),
                                           (".cache/x", "the run's own .cache"),
                                           ("report.json", "the run's own report.json")])
def test_the_output_and_the_runs_own_entries_are_refused(tmp_path, sentinel, path, pattern):
    refused(tmp_path, recipe_file(tmp_path, {"format": "native", "path": path}), sentinel, pattern)


def test_a_foreign_directory_inside_output_is_refused(tmp_path, sentinel):
    output = tmp_path / "out"
    (output / "checkpoint").mkdir(parents=True)
    (output / "checkpoint" / "notes.md").write_text("mine\n")
    recipe = recipe_file(tmp_path, {"format": "native"})
    refused(tmp_path, recipe, output / "checkpoint", "was not written by compress")


def test_exports_that_overlap_are_refused(tmp_path, sentinel):
    recipe = recipe_file(tmp_path, {"format": "native", "path": "a"}, extra_exports=[{"format": "gptq", "path": "a/b"}])
    refused(tmp_path, recipe, sentinel, "overlapping")
    recipe = recipe_file(tmp_path, {"format": "native", "path": "a"},
                         extra_exports=[{"format": "gptq", "path": "b", "adapter_path": "a"}])
    refused(tmp_path, recipe, sentinel, "the same directory as stages[1].export.path")


def test_the_default_adapter_path_is_checked_when_adapters_come(tmp_path, sentinel):
    lq_lora = {"lq_lora": {"rank": 4, "budget_bits": 4.5, "group_sizes": [64]}}
    stages = [lq_lora, {"export": {"format": "native", "path": "ckpt"}}]
    output = tmp_path / "out"
    (output / "ckpt-adapter").mkdir(parents=True)
    (output / "ckpt-adapter" / "mine.txt").write_text("mine\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "stages": stages, "output": str(output)}))
    refused(tmp_path, str(path), output / "ckpt-adapter", "stages[1].export.adapter_path")


def test_an_output_that_is_a_file_is_refused(tmp_path, sentinel):
    output = tmp_path / "out"
    output.write_text("a file\n")
    refused(tmp_path, recipe_file(tmp_path, {"format": "native"}, output=output), sentinel, "is not a directory")
    assert output.read_text() == "a file\n"


def test_an_output_name_too_long_is_refused(tmp_path, sentinel):
    recipe = recipe_file(tmp_path, {"format": "native"}, output=tmp_path / ("x" * 300))
    refused(tmp_path, recipe, sentinel, "file systems allow 255")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions cannot refuse it")
def test_an_output_in_an_unwritable_folder_is_refused(tmp_path, sentinel):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(tmp_path, recipe_file(tmp_path, {"format": "native"}, output=locked / "out"), sentinel,
                "is not writable")
    finally:
        locked.chmod(0o700)


def test_an_output_nobody_can_create_fails_the_run_with_one_line(tmp_path):
    """/proc takes no new directories, not even from root (for whom permission checks pass)."""
    code, stderr = run("run", recipe_file(tmp_path, {"format": "native"}, output="/proc/compress-out"), "--quiet")
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "/proc/compress-out" in lines[0], stderr
    assert "Traceback" not in stderr


def test_the_write_guard_refuses_what_appeared_after_validate(tmp_path):
    from compress.checkpoint.output_paths import guard_before_write

    target = tmp_path / "checkpoint"
    guard_before_write(target, "stages[1].export.path")  # absent: fine
    target.mkdir()
    guard_before_write(target, "stages[1].export.path")  # empty: fine
    (target / "notes.md").write_text("mine\n")
    with pytest.raises(CheckpointError, match="was not written by compress"):
        guard_before_write(target, "stages[1].export.path")


@pytest.mark.slow
def test_a_directory_we_wrote_is_replaced_and_nothing_else_is_touched(tmp_path, sentinel):
    """The ordinary case still works: a rerun replaces its own checkpoint and adapter."""
    stages = [{"lq_lora": {"rank": 4, "budget_bits": 4.5, "group_sizes": [64], "iterations": 1}},
              {"export": {"format": "native", "verify": False}}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-llama", "stages": stages, "output": str(tmp_path / "out"),
                                    "data": {"calibration": {"source": "stdlib", "samples": 2, "seq_len": 32}}}))
    before = file_hashes(sentinel)
    for flag in ("--quiet", "--overwrite"):
        code, stderr = run("run", str(path), flag) if flag != "--quiet" else run("run", str(path), "--quiet")
        assert code == 0, stderr
    assert (tmp_path / "out" / "checkpoint" / "compress.json").is_file()
    assert (tmp_path / "out" / "checkpoint-adapter" / "compress.json").is_file()
    assert file_hashes(sentinel) == before


def test_a_file_of_the_users_inside_our_own_export_is_not_deleted(tmp_path, sentinel):
    """Our manifest makes the directory ours, but not a file it does not list."""
    code, stderr = run("run", recipe_file(tmp_path, {"format": "native", "verify": False}), "--quiet")
    assert code == 0, stderr
    notes = tmp_path / "out" / "checkpoint" / "notes" / "NOTES.md"
    notes.parent.mkdir()
    notes.write_text("mine\n")
    code, stderr = run("run", recipe_file(tmp_path, {"format": "native", "verify": False}), "--overwrite")
    assert code == 2 and "holds 'notes'" in stderr and "does not list" in stderr, stderr
    assert notes.read_text() == "mine\n"


def test_links_and_files_in_the_way_are_refused_at_validate(tmp_path, sentinel):
    output = tmp_path / "out"
    (output / "real").mkdir(parents=True)
    os.symlink(output / "real", output / "ckpt")  # inside output, but a link: run would refuse it late
    refused(tmp_path, recipe_file(tmp_path, {"format": "native", "path": "ckpt"}), sentinel,
            "is not a directory written by compress")
    (output / "notes").write_text("a file\n")
    refused(tmp_path, recipe_file(tmp_path, {"format": "native", "path": "notes/x"}), sentinel, "is in the way")
    os.symlink(output / "loop2", output / "loop1")
    os.symlink(output / "loop1", output / "loop2")
    refused(tmp_path, recipe_file(tmp_path, {"format": "native", "path": "loop1/x"}), sentinel, "cannot be resolved")


def test_run_entries_in_another_letter_case_are_refused(tmp_path, sentinel):
    refused(tmp_path, recipe_file(tmp_path, {"format": "native", "path": ".STAGES"}), sentinel, "the run's own .STAGES")


def test_an_export_onto_the_model_being_read_is_refused(tmp_path, sentinel):
    code, stderr = run("run", recipe_file(tmp_path, {"format": "native", "verify": False}), "--quiet")
    assert code == 0, stderr
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump({"model": str(tmp_path / "out" / "checkpoint"), "output": str(tmp_path / "out"),
                                    "stages": [{"export": {"format": "native"}}]}))
    refused(tmp_path, str(path), sentinel, "would replace the model this run reads")


def test_a_trailing_slash_does_not_move_the_adapter_into_the_checkpoint():
    from compress.stages.export import ExportConfig

    assert ExportConfig(path="ckpt/").adapter_dir() == "ckpt-adapter"


def test_stale_write_leftovers_are_ours_only(tmp_path):
    from compress.checkpoint.atomic import atomic_directory

    (tmp_path / ".old-photos-2020").mkdir()  # the user's, despite the name
    (tmp_path / ".tmp-photos-abcd1234").mkdir()  # what a crashed write of ours leaves
    with atomic_directory(tmp_path / "photos") as staging:
        (staging / "x").write_text("x")
    assert (tmp_path / ".old-photos-2020").is_dir() and not (tmp_path / ".tmp-photos-abcd1234").exists()


def test_plan_reads_only_the_recipe(tmp_path):
    output = tmp_path / "out"
    output.write_text("a file: validate refuses it, a plan for elsewhere need not\n")
    code, stderr = run("plan", recipe_file(tmp_path, {"format": "native"}, output=output))
    assert code == 0, stderr
