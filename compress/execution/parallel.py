"""Independent per-matrix work spread over local processes.

``parallel_map(fn, jobs, workers)`` yields ``(key, fn(*args))`` for every ``jobs[key] = args`` as each
finishes (so callers can cache results one by one). With one worker it runs in this process, in
order. With more, it uses ``spawn``ed processes (safe with torch's threads), each limited to its
share of the CPU threads so that processes and intra-op threads do not oversubscribe the cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Callable, Iterator


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parallel_map(fn: Callable, jobs: dict, workers: int = 1) -> Iterator[tuple]:
    if workers <= 1 or len(jobs) <= 1:
        for key, args in jobs.items():
            yield key, fn(*args)
        return
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_limit_threads,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *args): key for key, args in jobs.items()}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
