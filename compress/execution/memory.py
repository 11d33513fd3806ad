"""Peak memory of a span of work: process RSS sampled in a background thread (CPU), or the CUDA
allocator's peak when a GPU is in use. ``resource``'s ru_maxrss cannot be reset, so it cannot give
per-stage peaks."""

from __future__ import annotations

import ctypes
import functools
import gc
import threading

import psutil
import torch

MIB = 1 << 20


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.rss_mib`` and, when ``device`` is a GPU,
    ``peak.cuda_mib`` (``torch.cuda.max_memory_allocated`` over the span; None otherwise)."""

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.02):
        self.interval = interval
        self.device = torch.device(device) if device is not None else None
        self.rss_mib = 0.0
        self.start_rss_mib = 0.0  # RSS when the span began: rss_mib - start_rss_mib is what it added
        self.cuda_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        self.rss_mib = max(self.rss_mib, self._process.memory_info().rss / MIB)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self._sample()
        self.start_rss_mib = self.rss_mib
        if self._on_gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._on_gpu:
            self.cuda_mib = torch.cuda.max_memory_allocated(self.device) / MIB

    @property
    def _on_gpu(self) -> bool:
        return self.device is not None and self.device.type == "cuda"


def release_freed_memory() -> None:
    """Free what reference cycles still hold, then ask glibc to hand its free heap pages back
    (``malloc_trim``; a no-op where it is not available), so that RSS measured afterwards reflects
    what is live.

    Without this a streamed walk's memory creeps up by most of a unit per unit: cycles (modules that
    refer to each other) wait for the garbage collector, and glibc keeps freed blocks below its
    adaptive mmap threshold (up to 32 MiB, the size of a layer's matrices) in the heap."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def fix_mmap_threshold(threshold: int = MIB) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, returned to the OS as
    soon as it is freed; False where the C library is not glibc (nothing changes).

    glibc raises its mmap threshold after each large free (up to 32 MiB), so a streamed walk's freed
    matrices then stay in its heap, fragmented, and its peak varies by a layer from run to run: on
    the 1.5 B synthetic model 623-704 MiB over 9 runs, 495-497 MiB over 4 with the threshold fixed,
    for a quarter more time (fresh pages; BENCHMARKS.md, Streaming). A process-wide setting that
    cannot be undone: ``compress run`` sets it for a streamed recipe, in its own process; a library
    caller of ``run_recipe`` decides for its process."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


@functools.cache
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


def model_tensor_bytes(model, dense_bytes: int | None = None) -> int:
    """Bytes of a model's parameters and buffers (a tied weight once); with ``dense_bytes``, floating
    tensors counted at that width (packed codes and integer tensors as stored)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        width = dense_bytes if dense_bytes and tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * width
    return total
