"""What a run may write and replace: only its own files, inside its ``output`` directory.

An export's ``path`` and ``adapter_path`` are relative to ``output`` and must resolve strictly inside
it (``..`` and symbolic links that lead out are refused), not onto or under the run's own entries
(``.stages``, ``.lock``, ``.cache``, ``report.json``, ``report.md``, in any letter case), not through
anything that is not a directory, and not onto the model the run reads; no two of a recipe's
exports may write the same directory or one inside another. A directory that is already there is
replaced only when it is empty or was written by us: it holds a ``compress.json`` manifest of ours
and nothing that manifest does not list. Anything else there is the user's, and the export is
refused before any work is done. The same check runs again just before the write.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError, CompressError, RecipeError
from .manifest import MANIFEST, read_manifest

RUN_ENTRIES = (".stages", ".lock", ".cache", "report.json", "report.md")


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _resolved(path: Path, where: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as err:  # a symbolic link loop, an unreadable component
        raise RecipeError(f"{where}: {path} cannot be resolved: {err}") from None


def export_target(output: Path, relative: str, where: str) -> Path:
    """``output / relative``, once it is known to resolve inside ``output`` and off the run's entries."""
    if Path(relative).is_absolute() or relative.startswith("~"):
        raise RecipeError(f"{where}: {relative!r} is not relative: export paths are relative to output "
                          f"({output}), and nothing outside it is written")
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        raise RecipeError(f"{where}: {relative!r} leaves output ({output}): '..' is not allowed in export paths")
    root, target = _resolved(output, "output"), _resolved(output / relative, where)
    if target == root:
        raise RecipeError(f"{where}: {relative!r} is output itself ({output}); name a directory inside it")
    if not _inside(target, root):
        raise RecipeError(f"{where}: {relative!r} resolves to {target}, outside output ({root}) "
                          "(a symbolic link leads out)")
    top = target.relative_to(root).parts[0]
    if top.casefold() in {entry.casefold() for entry in RUN_ENTRIES}:
        raise RecipeError(f"{where}: {relative!r} would replace the run's own {top} "
                          f"(reserved in output: {', '.join(RUN_ENTRIES)})")
    return output / relative


def unlisted_entries(directory: Path) -> list[str] | None:
    """What ``directory`` holds beyond what its manifest lists (None: no valid manifest of ours)."""
    if not (directory / MANIFEST).is_file():
        return None
    try:
        listed = set(read_manifest(directory, verify=False)["files"])
    except (CompressError, KeyError, TypeError):
        return None
    parents = {str(parent) for name in listed for parent in PurePosixPath(name).parents}
    extra = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        known = name in listed or name == MANIFEST if not path.is_dir() or path.is_symlink() else name in parents
        if not known:
            extra.append(name)
    return extra


def refuse_foreign(target: Path, where: str, error: type[CompressError] = RecipeError) -> None:
    """Refuse to replace ``target`` when something not written by us is there."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise error(f"{where}: {target} exists and is not a directory written by compress; move it away "
                    "or choose another path")
    if not target.is_dir() or not any(target.iterdir()):
        return
    extra = unlisted_entries(target)
    if extra is None:
        raise error(f"{where}: {target} exists and was not written by compress (no valid {MANIFEST} in it; an "
                    "adapter directory of an older compress has none); move it away or choose another path "
                    "(nothing was changed)")
    if extra:
        raise error(f"{where}: {target} holds {extra[0]!r}{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, "
                    f"which its {MANIFEST} does not list (not ours to delete); move it away (nothing was changed)")


def _refuse_blocked_parents(output: Path, target: Path, where: str) -> None:
    """Every existing folder between ``output`` and ``target`` is a real directory."""
    for parent in reversed(target.relative_to(output).parents[:-1]):
        step = output / parent
        if step.is_symlink() or (step.exists() and not step.is_dir()):
            raise RecipeError(f"{where}: {step} is in the way (a file or a symbolic link where a folder is needed)")


def check_export_paths(output: Path, exports: list[tuple[str, str]], model: Path | None = None) -> list[Path]:
    """Validate every (where, relative path) an export writes; returns the resolved targets. ``model``:
    the local directory the run reads its model from, which no export may replace."""
    targets: list[tuple[str, Path]] = []
    source = _resolved(model, "model") if model is not None else None
    for where, relative in exports:
        written = export_target(output, relative, where)
        target = _resolved(written, where)
        for other_where, other in targets:
            if target == other or _inside(target, other) or _inside(other, target):
                how = "the same directory as" if target == other else "a directory overlapping that of"
                raise RecipeError(f"{where}: {relative!r} is {how} {other_where}")
        if source is not None and (target == source or _inside(target, source) or _inside(source, target)):
            raise RecipeError(f"{where}: {relative!r} would replace the model this run reads ({model})")
        _refuse_blocked_parents(output, written, where)
        refuse_foreign(written, where)
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
