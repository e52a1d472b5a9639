"""The module graph of train/ and its sub-packages: no import cycles, counting imports inside functions (TYPE_CHECKING
ones aside)."""

import ast

from conftest import REPO

PACKAGES = {"train", *(f"train.{p.parent.name}" for p in (REPO / "train").glob("*/__init__.py"))}


def imports_of(path) -> set[str]:
    """The train.* modules a file imports anywhere but under `if TYPE_CHECKING:` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:  # from . import x, from ..data import store
            base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            found |= {f"{base}.{a.name}" for a in node.names} if not node.module else {base}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train"):
            names = [f"train.{a.name}" for a in node.names] if node.module in PACKAGES else [node.module]
            found |= set(names)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("train.")}
    return found


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_train_has_no_import_cycles():
    graph = {module_name(p): imports_of(p) for p in (REPO / "train").rglob("*.py")}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in done:
                visit(imported, [*path, imported])
        done.add(module)

    done: set[str] = set()
    for module in sorted(graph):
        visit(module, [module])
    assert cycles == []
