"""The stage registry: explicit, one file per stage, no discovery."""

from types import MappingProxyType

from . import evaluation, export, quantize

STAGES = MappingProxyType({stage.name: stage for stage in (quantize.STAGE, evaluation.STAGE, export.STAGE)})

__all__ = ["STAGES"]
