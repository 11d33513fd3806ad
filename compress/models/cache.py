"""Where derived artifacts (converted tokenizers and configs of built-in models) are cached.

``$COMPRESS_CACHE`` or ``~/.cache/compress``. Entries are written atomically; a cache that cannot
be written is skipped (the artifact is rebuilt each time)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("COMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compress")
    return Path(root)
