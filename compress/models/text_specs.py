"""The recipe's text-source specs (pydantic): where text comes from, and how much of it to cut.

``TextOrigin`` is a stage's ``data:`` (training text); ``SourceSpec`` is a recipe's
``data.calibration`` / ``data.eval``, an origin plus a window count and length. Both resolve to a
``compress.models.data.TextSource``. They live apart from ``compress.run.recipe`` so that the stages' configs
can use them while the recipe parser imports the stage registry.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, Field, model_validator

from ..stage import STRICT
from .data import TextSource


class TextOrigin(BaseModel):
    """Where text comes from: exactly one of ``source: stdlib``, ``path`` or ``hub``."""

    model_config = STRICT
    source: Optional[Literal["stdlib"]] = None
    path: Optional[str] = None
    hub: Optional[str] = None
    name: Optional[str] = None
    field: str = "text"
    split: Optional[str] = None

    @model_validator(mode="after")
    def _one_origin(self) -> "TextOrigin":
        given = [k for k in ("source", "path", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of source: stdlib, path: FILE or hub: NAME"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.source == "stdlib" and self.split not in (None, "train", "eval"):
            raise ValueError(f"split: {self.split!r} is not one of 'train', 'eval' for source stdlib")
        return self

    def text_source(self, role: str) -> TextSource:
        default_split = "eval" if role == "eval" else "train"
        if self.source == "stdlib":
            return TextSource("stdlib", self.split or default_split)
        if self.path is not None:
            return TextSource("file", self.split or "all", path=self.path, field=self.field)
        return TextSource("hub", self.split or ("test" if role == "eval" else "train"), path=self.hub,
                          field=self.field, hub_config=self.name)


class SourceSpec(TextOrigin):
    """A text source and how many windows of how many tokens to cut from it."""

    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
