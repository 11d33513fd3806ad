"""``compress.json``: the manifest of every checkpoint we write.

It names the format and version, each quantized module's config and shape, the resolved recipe,
and the sha256 of every other file in the directory. The manifest checks itself too: its
``manifest_sha256`` is the digest of the file's exact bytes with that value replaced by zeros, so a
changed byte anywhere in the directory is caught and the message names the file."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import CheckpointError, brief
from .atomic import sha256_file

MANIFEST = "compress.json"
ADAPTER_FORMAT = "peft"  # a PEFT adapter directory we wrote (no model in it)
FORMAT_VERSION = 1
_PLACEHOLDER = "0" * 64
_SELF_HASH = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')


def write_manifest(directory: Path, content: dict) -> dict:
    """Hash every file already in ``directory`` and write the manifest next to them."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    body = dict(content, format_version=FORMAT_VERSION, files=files, manifest_sha256=_PLACEHOLDER)
    text = json.dumps(body, indent=2, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    (directory / MANIFEST).write_text(text.replace(_PLACEHOLDER, digest, 1))
    return dict(body, manifest_sha256=digest)


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """The manifest, after checking it and (``verify``) every file it lists."""
    path = Path(directory) / MANIFEST
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    found = _SELF_HASH.search(raw)
    if found is None:
        raise CheckpointError(f"{path}: corrupt manifest (no valid manifest_sha256)")
    blank = raw[: found.start(1)] + _PLACEHOLDER.encode() + raw[found.end(1):]
    if hashlib.sha256(blank).hexdigest() != found.group(1).decode():
        raise CheckpointError(f"{path}: sha256 mismatch: the manifest is corrupt or was modified")
    try:
        content = json.loads(raw)
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON: {brief(err)}") from None
    if content.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {content.get('format_version')!r} is not supported "
                              f"(this compress reads {FORMAT_VERSION})")
    if verify:
        verify_files(Path(directory), content["files"])
    return content


def verify_files(directory: Path, files: dict[str, str]) -> None:
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        if sha256_file(path) != expected:
            raise CheckpointError(f"{path}: sha256 mismatch: the file is corrupt, truncated or was modified")
