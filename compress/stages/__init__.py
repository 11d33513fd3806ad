"""The stage registry: explicit, one file per stage, no discovery."""

from types import MappingProxyType

from . import evaluation, export, finetune, l4q, loram, lq_lora, prune, quantize

STAGES = MappingProxyType({stage.name: stage for stage in (prune.STAGE, loram.STAGE, quantize.STAGE, lq_lora.STAGE, l4q.STAGE, finetune.STAGE,
                                                          evaluation.STAGE, export.STAGE)})

__all__ = ["STAGES"]
