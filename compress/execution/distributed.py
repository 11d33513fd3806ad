"""Per-matrix work spread over the processes of a ``torchrun`` launch (``torch.distributed``).

    torchrun --nproc-per-node 2 -m compress.entry.cli run recipe.yaml          # CPU: gloo
    torchrun --nproc-per-node 8 -m compress.entry.cli run recipe.yaml          # one node, 8 GPUs: NCCL
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 \\
             --nproc-per-node 8 -m compress.entry.cli run recipe.yaml          # two nodes, shared disk

Every rank runs the whole recipe on the same model (or the same stream of layers) and takes its share
of the independent work units: the matrices of a GPTQ input group, the matrices of LQ-LoRA's cost
table and decomposition, the calibration windows of the Fisher pass. Results are exchanged so that
every rank continues with the same model. Rank 0 alone solves the ILP (the choice is broadcast),
holds the output lock and writes every file. A unit's result does not depend on which rank computed
it, and reductions run in a fixed order, so any number of ranks writes the same bytes as one process
with the same number of threads (torchrun gives each rank one; CPU matrix products round differently
with a different thread count).

Ranks never rely on staying in step: every list that is shared out is built from what every rank
agrees on (never from what one rank happens to find on disk), and ``share`` checks that agreement,
failing on every rank at once, naming the first difference, rather than leaving a unit to nobody.
``COMPRESS_RANK_DELAY=RANK:SECONDS`` makes that rank sleep before each unit of work it walks (each
item a stage's progress tracks): the tests use it to drive the ranks apart on purpose.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) nothing is initialized and every
call below is a local no-op.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import CompressError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch: ``rank`` of ``world`` (0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    delay: float = 0.0  # seconds this rank sleeps before each unit (COMPRESS_RANK_DELAY; tests)

    @property
    def main(self) -> bool:
        """Whether this rank writes files and solves the ILP."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, items: Iterable[T]) -> list[T]:
        """This rank's units: every ``world``-th item starting at ``rank`` (a fixed assignment) of a
        list that every rank must hold alike (checked)."""
        items = list(items)
        if self.distributed:
            self._check_agreement(items)
        return items[self.rank::self.world]

    def _check_agreement(self, items: list) -> None:
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, (_digest(items), len(items), repr(items[:2])[:80]))
        if len({part[0] for part in parts}) > 1:
            seen = "; ".join(f"rank {r}: {n} items, first {head}" for r, (_, n, head) in enumerate(parts))
            raise RankDisagreement(f"ranks disagree on the units they share out ({seen}): a shared-out list was "
                                   "built from state that differs between ranks (a bug: please report it)")

    def pace(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, with this rank's ``delay`` before each (no delay: unchanged)."""
        for item in items:
            if self.delay:
                time.sleep(self.delay)
            yield item

    def gather(self, local: dict) -> dict:
        """The union of every rank's ``local`` results, on every rank (keys are disjoint)."""
        if not self.distributed:
            return dict(local)
        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, local)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum_in_rank_order(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``tensor``, added in rank order (the same bytes on every rank)."""
        if not self.distributed:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_ranks() -> Ranks:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU, NCCL with CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
        log.info("rank %d of %d (%s)", dist.get_rank(), world, backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), _delay_for(dist.get_rank()))


class RankDisagreement(CompressError):
    """Ranks hold different lists to share out: a bug of ours, not bad input (exit code 1)."""

    exit_code = 1


def _digest(items: list) -> str:
    """A digest of a list of names, numbers or tensors (tensors by their bytes: repr elides long ones)."""
    digest = hashlib.sha256()
    for item in items:
        if isinstance(item, torch.Tensor):
            digest.update(str((item.dtype, tuple(item.shape))).encode())
            digest.update(item.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(item).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _delay_for(rank: int) -> float:
    """This rank's sleep per unit from ``COMPRESS_RANK_DELAY=RANK:SECONDS`` (0 when unset or another rank)."""
    setting = os.environ.get("COMPRESS_RANK_DELAY", "")
    if not setting:
        return 0.0
    who, _, seconds = setting.partition(":")
    try:
        delay = float(seconds) if int(who) == rank else 0.0
    except ValueError:
        delay = -1.0
    if not 0 <= delay < 3600:
        raise CompressError(f"COMPRESS_RANK_DELAY={setting!r}: expected RANK:SECONDS (0 to 3600), e.g. 1:0.5")
    return delay


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
