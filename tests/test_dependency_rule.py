"""The rule of dependence (DESIGN.md), checked on the source with ``ast`` (nothing is imported).

- The libraries ``quant/``, ``prune/``, ``lowrank/``, ``kernels/`` (installed as ``compress.quant``,
  ``compress.prune``, ``compress.lowrank``, ``compress.kernels``) import no ``compress`` module but
  each other's, and no relative import leaves the library.
- The modules installed under ``compress`` (``compress/`` and the libraries) import each other
  without cycles. Every import counts: top-level ones and those inside functions, which only hide a
  cycle. The package root ``compress/__init__.py`` is left out: it is the public facade whose imports
  are all deferred by design, and modules import it only for ``__version__``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name -> source folder, as pyproject.toml's [tool.setuptools.package-dir] installs them
PACKAGE_DIRS = {"compress": "compress", "compress.quant": "quant", "compress.prune": "prune",
                "compress.lowrank": "lowrank", "compress.kernels": "kernels"}
LIBRARIES = ("compress.quant", "compress.prune", "compress.lowrank", "compress.kernels")
FACADE = "compress"


@dataclass(frozen=True)
class Import:
    """One import statement's target as written (``text``) and resolved to a module name."""

    source: str  # the importing file, relative to the repository root
    line: int
    text: str
    target: str | None  # None: a relative import that climbs above its top-level package
    relative: bool = False


def _module_files() -> dict[str, Path]:
    """{module name: file} of every module installed under ``compress``."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _imports(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import in the file (at any depth), relative ones resolved against ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source, found = str(path.relative_to(ROOT)), []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [Import(source, node.lineno, f"import {a.name}", a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    found.append(Import(source, node.lineno, text, None, relative=True))
                    continue
                base = ".".join(parts[:len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
            found += [Import(source, node.lineno, text, target, node.level > 0) for target in sorted(targets)]
    return found


def _all_imports() -> dict[str, list[Import]]:
    files = _module_files()
    return {name: _imports(name, path, set(files)) for name, path in files.items()}


def _library_of(module: str) -> str | None:
    return next((library for library in LIBRARIES if _under(module, library)), None)


def library_violations() -> list[str]:
    """'file:line: import ... (why)' for each import of a library that breaks the rule."""
    problems = []
    for module, imports in _all_imports().items():
        library = _library_of(module)
        if library is None:
            continue
        for found in imports:
            where = f"{found.source}:{found.line}: {found.text}"
            if found.target is None or (found.relative and not _under(found.target, library)):
                reaches = f" to {found.target}" if found.target else ""
                problems.append(f"{where} (relative import escapes {library}{reaches})")
            elif _under(found.target, "compress") and _library_of(found.target) is None:
                problems.append(f"{where} (imports orchestration module {found.target})")
    return problems


def _import_graph() -> dict[str, dict[str, Import]]:
    """{module: {imported module: the first import of it}} among compress's modules, the facade left
    out; the libraries are in it, so a cycle that passes through one is found too."""
    imports = _all_imports()
    graph: dict[str, dict[str, Import]] = {}
    for module, found in imports.items():
        if module != FACADE:
            edges = graph.setdefault(module, {})
            for item in found:
                if item.target in imports and item.target not in (FACADE, module):
                    edges.setdefault(item.target, item)
    return graph


def _cycle_from(start: str, graph: dict[str, dict[str, Import]], members: set[str]) -> list[str]:
    """One cycle through ``start`` inside a strongly connected component (breadth-first, shortest)."""
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for target in sorted(graph[node]):
                if target == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target in members and target not in previous:
                    previous[target] = node
                    nxt.append(target)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle")


def _components(graph: dict[str, dict[str, Import]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    result.append(component)
    return result


def import_cycles() -> list[str]:
    """One readable cycle per strongly connected component, each edge with its file:line."""
    graph = _import_graph()
    described = []
    for component in _components(graph):
        cycle = _cycle_from(min(component), graph, component)
        edges = [graph[a][b] for a, b in zip(cycle, cycle[1:])]
        described.append(" -> ".join(cycle) + "\n" + "\n".join(
            f"    {e.source}:{e.line}: {e.text}" for e in edges) + f"\n    (component: {', '.join(sorted(component))})")
    return described


def test_libraries_import_no_orchestration():
    problems = library_violations()
    assert not problems, "libraries import compress orchestration:\n" + "\n".join(problems)


def test_orchestration_modules_have_no_import_cycles():
    cycles = import_cycles()
    assert not cycles, "import cycles among compress modules:\n" + "\n".join(cycles)


def test_the_walk_sees_every_package():
    files = _module_files()
    assert {"compress.training.loop", "compress.checkpoint.load", "compress.stages.prune", "compress.prune.units",
            "compress.quant", "compress.lowrank.lora", "compress.kernels.reference"} <= set(files)
    assert all(path.is_file() for path in files.values())


def test_kernels_and_quant_meet_only_at_the_kernel_weight():
    """Kernels never import quant; quant reaches kernels only for the one declared type they share
    (``KernelWeight``, which quant builds) and, in ``QuantLinear``'s forward, the dispatcher."""
    imports = _all_imports()
    kernels_to_quant = [f"{i.source}:{i.line}: {i.text}" for module, found in imports.items()
                        if _under(module, "compress.kernels") for i in found
                        if i.target and _under(i.target, "compress.quant")]
    assert not kernels_to_quant, "kernels import quant:\n" + "\n".join(kernels_to_quant)
    allowed = {"from compress.kernels.layout import KernelWeight", "from compress import kernels"}
    quant_to_kernels = [f"{i.source}:{i.line}: {i.text}" for module, found in imports.items()
                        if _under(module, "compress.quant") for i in found
                        if i.target and _under(i.target, "compress.kernels") and i.text not in allowed]
    assert not quant_to_kernels, "quant imports kernels beyond KernelWeight:\n" + "\n".join(quant_to_kernels)
    dispatch = [i.source for module, found in imports.items() if _under(module, "compress.quant") for i in found
                if i.text == "from compress import kernels"]
    assert dispatch == ["quant/linear.py"], dispatch


def test_safetensors_files_are_read_and_written_in_one_module():
    """Only ``compress.checkpoint.tensors`` imports the safetensors library (the others go through
    its reader and writer, so that one header check and one write order hold everywhere)."""
    found = [f"{i.source}:{i.line}: {i.text}" for module, imports in _all_imports().items() for i in imports
             if i.target and _under(i.target, "safetensors") and module != "compress.checkpoint.tensors"]
    assert not found, "safetensors used outside checkpoint/tensors.py:\n" + "\n".join(found)


# The folders of compress/, lowest first: a module imports only its own folder's modules, the
# foundations at the root (errors, dtypes, targets, the stage contract, the model state), lower folders
# and the libraries (README "Layout").
LAYERS = ("checkpoint", "models", "planning", "execution", "training", "stages", "run", "entry")


def _layer(module: str) -> int:
    """-1 for the libraries, 0 for compress/'s root modules, then 1 + the folder's place in LAYERS."""
    if _library_of(module):
        return -1
    parts = module.split(".")
    return 1 + LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else 0


def layer_violations() -> list[str]:
    return [f"{imp.source}:{imp.line}: {module} imports {target} (a higher folder)"
            for module, targets in _import_graph().items() for target, imp in targets.items()
            if _layer(target) > _layer(module)]


def test_each_folder_imports_only_the_folders_below_it():
    assert layer_violations() == []


def test_every_package_is_installed():
    """A regular (non-editable) install gets every folder: pyproject's ``packages`` lists each one."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(("compress", *init.parent.relative_to(ROOT / "compress").parts))
             for init in (ROOT / "compress").rglob("__init__.py")}
    assert found - listed == set()
