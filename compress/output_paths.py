"""What a run may write and replace: only its own files, inside its ``output`` directory.

An export's ``path`` and ``adapter_path`` are relative to ``output`` and must resolve strictly inside
it (``..`` and symbolic links that lead out are refused), not onto or under the run's own entries
(``.stages``, ``.lock``, ``.cache``, ``report.json``, ``report.md``), and no two of a recipe's
exports may write the same directory or one inside another. A directory that is already there is
replaced only when it is empty or was written by us (it holds a ``compress.json`` manifest of ours);
anything else there is the user's, and the export is refused before any work is done. The same
check runs again just before the write.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .checkpoint.manifest import MANIFEST, read_manifest
from .errors import CheckpointError, CompressError, RecipeError

RUN_ENTRIES = (".stages", ".lock", ".cache", "report.json", "report.md")


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def export_target(output: Path, relative: str, where: str) -> Path:
    """``output / relative``, once it is known to resolve inside ``output`` and off the run's entries."""
    if Path(relative).is_absolute() or relative.startswith("~"):
        raise RecipeError(f"{where}: {relative!r} is not relative: export paths are relative to output "
                          f"({output}), and nothing outside it is written")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if ".." in parts:
        raise RecipeError(f"{where}: {relative!r} leaves output ({output}): '..' is not allowed in export paths")
    root = output.resolve()
    target = (output / relative).resolve()
    if target == root:
        raise RecipeError(f"{where}: {relative!r} is output itself ({output}); name a directory inside it")
    if not _inside(target, root):
        raise RecipeError(f"{where}: {relative!r} resolves to {target}, outside output ({root}) "
                          "(a symbolic link leads out)")
    top = target.relative_to(root).parts[0]
    if top in RUN_ENTRIES:
        raise RecipeError(f"{where}: {relative!r} would replace the run's own {top} "
                          f"(reserved in output: {', '.join(RUN_ENTRIES)})")
    return output / relative


def written_by_us(directory: Path) -> bool:
    """Whether ``directory`` holds a manifest of ours whose own digest checks out."""
    if not (directory / MANIFEST).is_file():
        return False
    try:
        read_manifest(directory, verify=False)
    except CompressError:
        return False
    return True


def refuse_foreign(target: Path, where: str, error: type[CompressError] = RecipeError) -> None:
    """Refuse to replace ``target`` when something not written by us is there."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise error(f"{where}: {target} exists and is not a directory written by compress; move it away "
                    "or choose another path")
    if target.is_dir() and any(target.iterdir()) and not written_by_us(target):
        raise error(f"{where}: {target} exists and was not written by compress (no valid {MANIFEST} in it); "
                    "move it away or choose another path (nothing was changed)")


def check_export_paths(output: Path, exports: list[tuple[str, str]]) -> list[Path]:
    """Validate every (where, relative path) an export writes; returns the resolved targets."""
    targets: list[tuple[str, Path]] = []
    for where, relative in exports:
        target = export_target(output, relative, where).resolve()
        for other_where, other in targets:
            if target == other or _inside(target, other) or _inside(other, target):
                how = "the same directory as" if target == other else "a directory overlapping that of"
                raise RecipeError(f"{where}: {relative!r} is {how} {other_where}")
        refuse_foreign(target, where)
        targets.append((where, target))
    return [t for _, t in targets]


def guard_before_write(target: Path, where: str) -> None:
    """The run-time twin of the validate check: nothing foreign appeared at ``target`` meanwhile."""
    refuse_foreign(target, where, CheckpointError)


def check_output(output: Path) -> None:
    """``output`` is a directory, or can be made one, that this user may write."""
    too_long = next((part for part in output.parts if len(part.encode()) > 255), None)
    if too_long is not None:
        raise RecipeError(f"output: the name {too_long[:40]!r}... is {len(too_long.encode())} bytes long "
                          "(file systems allow 255)")
    if output.exists() and not output.is_dir():
        raise RecipeError(f"output: {output} exists and is not a directory")
    existing = next((p for p in (output, *output.parents) if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if existing is not None and not existing.is_dir() else "is not writable"
        raise RecipeError(f"output: {output} cannot be created: {existing} {what}")
