"""Bad input, generated: hypothesis mutates valid recipes and a model's config.json, and every case
must end in exit code 0 (the mutation happened to be valid) or 2 with exactly one line on stderr,
never a traceback.

Recipes: the shipped ones and every stage docstring's sample, with values replaced by values of other
types, keys added, removed or misspelt, and stages reordered or duplicated; checked with
``compress validate`` (strict parsing, cross-stage rules, and each stage's checks against the model's
structure). config.json: a tiny Llama's, with fields replaced, removed or added; checked with
``compress validate`` on a recipe that uses the directory and with ``compress plan --model``.

Hostile inputs that must all be refused: export paths (``path``, ``adapter_path``) that leave the
output (absolute, ``..``, through a symbolic link), land on it or on its run entries; outputs that
cannot be a directory; recipes with bytes that are not UTF-8. ``validate`` and ``run`` must each exit 2
with one line (``plan`` too for the bytes; it reads no other file), and a sentinel directory beside the
output must be untouched.
"""

import contextlib
import copy
import io
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from conftest import file_hashes
from hypothesis import strategies as st

from compress.entry import cli
from compress.stages import STAGES

ROOT = Path(__file__).resolve().parent.parent
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["re:(", "nf", "gptq", "-1", "1e400", "../x", ""]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def docstring_stages() -> list[dict]:
    samples = []
    for stage in STAGES.values():
        doc = __import__(stage.run.__module__, fromlist=["_"]).__doc__
        block = doc.split("```yaml", 1)[1].split("```", 1)[0]
        samples += [item for item in yaml.safe_load(block)]
    return samples


def base_recipes() -> list[dict]:
    recipes = [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "recipes").glob("*.yaml"))]
    for stage in docstring_stages():
        recipes.append({"model": "tiny-llama", "stages": [stage], "output": "out/fuzz"})
    for recipe in recipes:
        recipe["model"] = "tiny-llama"  # structure checks in milliseconds, nothing to download
    return recipes


def paths(node, prefix=()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, prefix + (index,))
    return found


def mutate(data, draw) -> object:
    data = copy.deepcopy(data)
    where = draw(st.sampled_from(paths(data)))
    parent = data
    for step in where[:-1]:
        parent = parent[step]
    key = where[-1]
    kind = draw(st.sampled_from(["replace", "delete", "add", "rename", "reorder"]))
    if kind == "replace":
        parent[key] = draw(VALUES)
    elif kind == "delete":
        del parent[key]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
    elif kind == "rename" and isinstance(parent, dict):
        parent[f"{key}x" if isinstance(key, str) else str(key)] = parent.pop(key)
    elif isinstance(data, dict) and isinstance(data.get("stages"), list) and data["stages"]:
        stages = data["stages"]
        data["stages"] = draw(st.permutations(stages)) + draw(st.lists(st.sampled_from(stages), max_size=2))
    return data


def run(*argv: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(list(argv))
    return code, err.getvalue()


def assert_clean(code: int, stderr: str, case) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code in (0, 2), (code, stderr[-2000:], case)
    assert "Traceback" not in stderr, (stderr[-2000:], case)
    if code == 2:
        assert len(errors) == 1, (stderr, case)


BASES = base_recipes()


@FUZZ
@given(data=st.data())
def test_mutated_recipes_fail_with_one_line(tmp_path_factory, data):
    recipe = mutate(data.draw(st.sampled_from(BASES)), data.draw)
    path = tmp_path_factory.mktemp("fuzz") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    assert_clean(*run("validate", str(path)), recipe)


def test_a_wrong_value_at_any_top_level_key_is_refused(tmp_path):
    """The fuzz above lets a mutation that stays valid pass; this checks that the checks bite."""
    for index, base in enumerate(BASES):
        for key in base:
            path = tmp_path / f"{index}-{key}.yaml"
            path.write_text(yaml.safe_dump(dict(base, **{key: {"not": "right"}})))
            code, stderr = run("validate", str(path))
            assert code == 2 and len(stderr.strip().splitlines()) == 1, (key, stderr)


@pytest.fixture(scope="module")
def model_config(tiny_pair, tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("config")
    tiny_pair[0].config.save_pretrained(directory)
    return json.loads((directory / "config.json").read_text())


@FUZZ
@given(data=st.data())
def test_mutated_config_json_fails_with_one_line(model_config, tmp_path_factory, data):
    config = mutate(model_config, data.draw)
    directory = tmp_path_factory.mktemp("model")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"")  # a model directory; weights are never read here
    recipe = directory / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(directory), "stages": [{"quantize": {}}],
                                      "output": str(directory / "out")}))
    assert_clean(*run("validate", str(recipe)), config)
    assert_clean(*run("plan", "--model", str(directory / "config.json")), config)


SEGMENT = st.text(st.sampled_from("abc.-_~ /\\"), min_size=1, max_size=8)
RESERVED = [".", "./", "a/..", ".stages", ".stages/00-quantize", "./.lock", ".cache", ".cache/lq_lora",
            "report.json", "report.md", "x/../.stages"]


def hostile_paths(sentinel: Path):
    """Export paths that must all be refused: out of output, onto output or its run entries, or
    through a symbolic link (``link``, made inside output) that leads to the sentinel."""
    return st.one_of(
        st.just(str(sentinel)),
        st.builds(lambda tail: str(sentinel / tail.strip("/")), SEGMENT),
        st.builds(lambda tail: "/" + tail, SEGMENT),
        st.builds(lambda ups, tail: "../" * ups + tail, st.integers(1, 3), SEGMENT),
        st.builds(lambda head, ups: f"{head.strip('/') or 'a'}/" + "../" * ups + "precious", SEGMENT, st.integers(2, 3)),
        st.builds(lambda tail: "link/" + tail.strip("/"), SEGMENT),
        st.just("link"),
        st.sampled_from(RESERVED))


def hostile_outputs(sentinel: Path):
    """Outputs that cannot be a run's directory: an existing file, below a file, a name too long."""
    return st.one_of(st.just(sentinel / "thesis.txt"), st.just(sentinel / "thesis.txt" / "out"),
                     st.builds(lambda n: sentinel.parent / ("o" * n), st.integers(256, 300)))


def non_utf8(text: str, draw) -> bytes:
    raw = text.encode()
    at = draw(st.integers(0, 10**6)) % (len(raw) + 1)  # drawn alike whatever the text's length
    return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc", b"\xfe\xfe"])) + raw[at:]


def assert_refused_and_untouched(recipe: Path, sentinel: Path, before: dict, case, plan_refuses: bool) -> None:
    """validate and run refuse it; plan (which reads no files but the recipe) refuses unreadable bytes
    and may plan the rest; none touches the sentinel."""
    for argv in (("validate", str(recipe)), ("run", str(recipe), "--quiet"), ("plan", str(recipe))):
        code, stderr = run(*argv)
        assert code == 2 or (argv[0] == "plan" and not plan_refuses), (argv, stderr[-2000:], case)
        assert_clean(code, stderr, case)
        assert file_hashes(sentinel) == before, (argv, case)


@FUZZ
@given(data=st.data())
def test_hostile_export_paths_outputs_and_bytes_touch_nothing(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("hostile")
    sentinel = root / "precious"
    sentinel.mkdir()
    (sentinel / "thesis.txt").write_text("years of work\n")
    output = root / "out"
    output.mkdir()
    os.symlink(sentinel, output / "link")
    before = file_hashes(sentinel)
    kind = data.draw(st.sampled_from(["path", "adapter_path", "output", "bytes"]))
    export = {"format": "native"}
    recipe = {"model": "tiny-llama", "stages": [{"quantize": {"config": {"bits": 4, "group_size": 64}}}],
              "output": str(output)}
    if kind in ("path", "adapter_path"):
        export[kind] = data.draw(hostile_paths(sentinel))
    elif kind == "output":
        recipe["output"] = str(data.draw(hostile_outputs(sentinel)))
    recipe["stages"].append({"export": export})
    path = root / "recipe.yaml"
    text = yaml.safe_dump(recipe, allow_unicode=True)
    path.write_bytes(non_utf8(text, data.draw) if kind == "bytes" else text.encode())
    assert_refused_and_untouched(path, sentinel, before, (kind, recipe), plan_refuses=kind == "bytes")
