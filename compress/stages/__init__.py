"""The stage registry: explicit, one file per stage, no discovery."""

from types import MappingProxyType

from . import evaluation, export, finetune, lq_lora, prune, quantize

STAGES = MappingProxyType({stage.name: stage for stage in (prune.STAGE, quantize.STAGE, lq_lora.STAGE, finetune.STAGE,
                                                          evaluation.STAGE, export.STAGE)})

__all__ = ["STAGES"]
