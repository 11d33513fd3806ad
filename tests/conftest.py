"""Shared fixtures: offline environment, the tiny random Llama, and a CLI runner."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # as the CLI sets it: in-process CLI runs print no third-party bars
# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the switch must be set
# before triton is first imported. With a GPU (nvidia-smi present) the same tests run compiled on CUDA.
if __import__("shutil").which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GPTQMODEL_CKPT = ROOT / "tests" / "data" / "gptqmodel-mixed-tiny"
# the interop side venv (`make interop-venv`: GPTQModel, compressed-tensors); `make test` sets
# COMPRESS_REQUIRE_INTEROP=1 so that a missing venv fails the interop tests instead of skipping them
INTEROP_PYTHON = Path(os.environ.get("COMPRESS_INTEROP_PYTHON", ROOT / ".venv-gptqmodel" / "bin" / "python"))
INTEROP_REQUIRED = os.environ.get("COMPRESS_REQUIRE_INTEROP") == "1"
INTEROP_MARKS = [pytest.mark.interop,
                 pytest.mark.skipif(not INTEROP_PYTHON.exists() and not INTEROP_REQUIRED,
                                    reason=f"interop side venv missing at {INTEROP_PYTHON} (run `make interop-venv`)")]


def require_interop() -> None:
    """Fail (not skip) when the interop venv is missing where it is required."""
    if not INTEROP_PYTHON.exists():
        pytest.fail(f"COMPRESS_REQUIRE_INTEROP=1 but the interop side venv is missing at {INTEROP_PYTHON}")  # written by GPTQModel 7.6.0 itself


@pytest.fixture(scope="session")
def tiny_pair():
    """(model, tokenizer) of the built-in tiny-llama, loaded once per session."""
    from compress.models.sources import load_model, resolve_model

    return load_model(resolve_model("tiny-llama"), "float32")


@pytest.fixture(scope="session")
def sharded_tiny(tiny_pair, tmp_path_factory):
    """tiny-llama as a Hugging Face directory in many small shards (tensors split across files)."""
    model, tokenizer = tiny_pair
    directory = tmp_path_factory.mktemp("sharded") / "tiny"
    model.save_pretrained(directory, max_shard_size="200KB")
    tokenizer.save_pretrained(directory)
    assert len(list(directory.glob("model-*.safetensors"))) > 4
    return directory


@pytest.fixture
def tiny_model(tiny_pair):
    """A fresh copy of tiny-llama that a test may modify."""
    return copy.deepcopy(tiny_pair[0])


@pytest.fixture
def tokenizer(tiny_pair):
    return tiny_pair[1]


@pytest.fixture
def probe_ids():
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(7))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the ``compress`` command line in a subprocess (as a user would)."""
    return subprocess.run([sys.executable, "-m", "compress.entry.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_RECIPE = """
model: tiny-llama
data:
  calibration: {{source: stdlib, split: train, samples: 4, seq_len: 64}}
  eval:        {{source: stdlib, split: eval,  samples: 4, seq_len: 64}}
stages:
{stages}
output: {output}
"""


def tiny_recipe(tmp_path: Path, stages: str, output: Path | None = None, name: str = "recipe.yaml") -> Path:
    output = output or tmp_path / "out"
    return write_recipe(tmp_path / name, TINY_RECIPE.format(stages=stages, output=output))


def micro_llama(hidden: int = 128, layers: int = 2, vocab: int = 512, intermediate: int = 256, seed: int = 0):
    """A very small random Llama (no tokenizer) for checkpoint tests that copy files around."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=intermediate, vocab_size=vocab,
                         head_dim=hidden // 4, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def quantize_model(model, config_for):
    """Replace every decoder Linear by a QuantLinear with ``config_for(name)`` (None = keep dense)."""
    from compress.quant import QuantLinear
    from compress.targets import select_linears, set_module

    for name, module in select_linears(model, ["Linear"], ["lm_head"]):
        config = config_for(name)
        if config is not None:
            set_module(model, name, QuantLinear.quantize(module, config))
    return model


def walk_context(units, windows: torch.Tensor):
    """The few fields of a stage's context that a walk over ``units`` reads (``fisher_by_layer``):
    one process, on the CPU, ``windows`` for every role, no progress display."""
    from types import SimpleNamespace

    from compress.execution.distributed import Ranks

    return SimpleNamespace(units=units, model=units.model, ranks=Ranks(), windows=lambda role: windows,
                           track=lambda items, *_: items, entry=SimpleNamespace(where="stages[0].lq_lora"),
                           device=torch.device("cpu"))


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under ``directory``, by relative path."""
    import hashlib

    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits
