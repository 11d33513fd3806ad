"""The stage registry: explicit, one file per stage (and its helpers), no discovery; the StageReport
every stage fills (report.py). Imports training/, execution/, planning/, models/ and checkpoint/."""

from types import MappingProxyType

from . import evaluation, export, finetune, l4q, loram, lq_lora, prune, quantize

STAGES = MappingProxyType({stage.name: stage for stage in (prune.STAGE, loram.STAGE, quantize.STAGE, lq_lora.STAGE, l4q.STAGE, finetune.STAGE,
                                                          evaluation.STAGE, export.STAGE)})

__all__ = ["STAGES"]
