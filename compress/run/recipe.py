"""Recipes: YAML in, a typed, validated ``Recipe`` out; one-line errors that say where and what.

```yaml
model: smollm2-135m        # built-in name | local HF directory | path to a .gguf file
dtype: float32             # float32 | bfloat16 | float16
data:
  calibration: {source: stdlib, split: train, samples: 128, seq_len: 512}
  eval:        {source: stdlib, split: eval,  samples: 32,  seq_len: 512}
stages:                    # ordered list; each item is a one-key mapping
  - quantize: {method: rtn, config: {type: uniform, bits: 4, group_size: 64, sym: false},
               overrides: {"re:.*down_proj$": {bits: 8}}, ignore: [lm_head]}
  - eval: {}
  - export: {format: gptq}
output: out/quickstart
seed: 0
streaming: false           # true: hold one decoder layer at a time (compress.execution.streaming)
device: auto               # auto | cpu | cuda | cuda:N: where stages compute (compress.execution.device)
kernel: auto               # auto | fast: fast also sends fp32 activations through the CPU fast paths (compress.kernels)
```
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from .. import __version__
from ..config_errors import format_validation_error
from ..dtypes import RECIPE_DTYPES
from ..errors import RecipeError
from ..models.text_specs import SourceSpec
from ..stage import STRICT, Stage, StageConfig
from ..stages import STAGES


class DataSpec(BaseModel):
    model_config = STRICT
    calibration: SourceSpec = SourceSpec(source="stdlib", split="train", samples=128, seq_len=512)
    eval: SourceSpec = SourceSpec(source="stdlib", split="eval", samples=32, seq_len=512)


class RecipeSpec(BaseModel):
    model_config = STRICT
    model: str
    dtype: Literal[RECIPE_DTYPES] = "float32"
    data: DataSpec = DataSpec()
    stages: list[Any] = Field(min_length=1)
    output: str
    seed: int = 0
    streaming: bool = False
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    kernel: Literal["auto", "fast"] = "auto"


@dataclass(frozen=True)
class StageEntry:
    index: int
    name: str
    stage: Stage
    config: StageConfig

    @property
    def where(self) -> str:
        return f"stages[{self.index}].{self.name}"

    def to_dict(self) -> dict:
        return {self.name: self.config.model_dump(mode="json")}


@dataclass(frozen=True)
class Recipe:
    spec: RecipeSpec
    stages: tuple[StageEntry, ...]

    @property
    def output(self) -> Path:
        return Path(self.spec.output)

    def to_dict(self) -> dict:
        """The resolved recipe: every default filled in."""
        head = self.spec.model_dump(mode="json", exclude={"stages"})
        return dict(head, stages=[entry.to_dict() for entry in self.stages])

    def fingerprint(self, upto: int) -> str:
        """Digest of everything that determines the state after stage ``upto`` (inclusive)."""
        resolved = self.to_dict()
        resolved["stages"] = resolved["stages"][: upto + 1]
        resolved.pop("output")
        resolved.pop("device")  # where it computes, not what: a run may resume on another device
        resolved.pop("kernel")  # how packed layers multiply, not what they hold
        resolved["compress_version"] = __version__
        return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()

    def later(self, index: int, name: str) -> list[StageEntry]:
        return [e for e in self.stages[index + 1:] if e.name == name]


def _parse_stage(index: int, item: Any, registry: dict[str, Stage]) -> StageEntry:
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(f"stages[{index}]: each stage is a one-key mapping such as '- eval: {{}}' "
                          f"(got {type(item).__name__} {item!r:.60})")
    name, body = next(iter(item.items()))
    if name not in registry:
        raise RecipeError(f"stages[{index}]: unknown stage {name!r}; available: {', '.join(registry)}")
    stage = registry[name]
    body = {} if body is None else body
    if not isinstance(body, dict):
        raise RecipeError(f"stages[{index}].{name}: expected a mapping of settings, got {body!r:.60}")
    try:
        config = stage.config.model_validate(body)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, f"stages[{index}].{name}", stage.config)) from None
    return StageEntry(index, name, stage, config)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    """Validate a loaded YAML document; raises RecipeError with one line on the first problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with model, stages and output "
                          f"(got {type(data).__name__})")
    try:
        spec = RecipeSpec.model_validate(data)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, "", RecipeSpec)) from None
    stages = tuple(_parse_stage(i, item, STAGES) for i, item in enumerate(spec.stages))
    return Recipe(spec, stages)


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently, so a typo'd copy would override a setting without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is the base loader's error to report
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file does not exist") from None
    except OSError as err:
        raise RecipeError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "save the recipe as UTF-8") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{path}:{place}: not valid YAML: {problem}") from None
    return parse_recipe(data, str(path))
