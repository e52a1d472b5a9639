"""The README's map of the tree (the list under "### Map of the tree", at the top of "## Development") is the tree:
every module of train/ is listed once, every listed path exists, every sub-package has its line, and tests/ mirrors
train/'s sub-packages.

A module added, moved or removed fails here until the map says so; each line reads
`- `train/<pkg>/<module>.py` - what it holds`, under its sub-package's line. Check with:
    .venv/bin/python -m pytest tests/test_readme_map.py -q
"""

import ast
import re
from collections import Counter

from conftest import REPO

MAP_HEADING = "### Map of the tree"  # under "## Development"
MAP_LINE = re.compile(r"^\s*- `([^`]+)`", re.MULTILINE)  # a list item that opens with a path in backquotes


def map_section() -> str:
    """The README's text from MAP_HEADING (which must sit in "## Development") to the next heading."""
    readme = (REPO / "README.md").read_text()
    development = readme.index("\n## Development\n")
    start = readme.index(f"\n{MAP_HEADING}\n", development)
    assert readme.find("\n## ", development + 1, start) == -1, f"{MAP_HEADING!r} is not in '## Development'"
    end = re.compile(r"^#{2,3} ", re.MULTILINE).search(readme, start + len(MAP_HEADING) + 2)
    return readme[start : end.start() if end else len(readme)]


def listed_paths() -> list[str]:
    return MAP_LINE.findall(map_section())


def modules() -> set[str]:
    """train/**/*.py but the packages' __init__.py, as paths from the repository root."""
    return {p.relative_to(REPO).as_posix() for p in (REPO / "train").rglob("*.py") if p.name != "__init__.py"}


def sub_packages() -> set[str]:
    return {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / "train").glob("*/__init__.py")}


def suggested_line(path: str) -> str:
    """A map line for `path` from the first sentence of its docstring, to shorten before it goes in."""
    docstring = ast.get_docstring(ast.parse((REPO / path).read_text())) or "what it holds"
    first_paragraph = " ".join(docstring.split("\n\n")[0].split())
    return f"- `{path}` - {first_paragraph.split('. ')[0].rstrip('.')}"


def test_every_module_of_train_is_in_the_map_once():
    listed = Counter(path for path in listed_paths() if path.endswith(".py") and path.startswith("train/"))
    unlisted = sorted(modules() - set(listed))
    assert not unlisted, (
        f"README.md, '{MAP_HEADING}' does not list {len(unlisted)} modules; add these lines, each under its "
        "sub-package's line, and say in a few words what the module holds:\n" + "\n".join(map(suggested_line, unlisted))
    )
    assert [path for path, count in listed.items() if count > 1] == []


def test_every_path_in_the_map_exists():
    missing = [path for path in listed_paths() if not (REPO / path).exists()]
    assert not missing, f"README.md, '{MAP_HEADING}' lists {missing}, which do not exist: rename or remove them"


def test_the_map_has_a_line_for_every_sub_package_and_the_top_level():
    listed = set(listed_paths())
    expected = sub_packages() | {"launch.py", "config/", "accelerate_config/", "scripts/", "tests/"}
    assert sorted(expected - listed) == []


def test_the_map_lists_modules_under_their_own_sub_package():
    """A module's line follows its sub-package's line (and precedes the next sub-package's)."""
    package = None
    for path in listed_paths():
        if path in sub_packages():
            package = path
        elif path.startswith("train/") and path.count("/") > 1:
            assert package is not None and path.startswith(package), f"{path} is listed under {package}"


def test_tests_mirror_the_sub_packages_of_train():
    names = {package.removeprefix("train/").rstrip("/") for package in sub_packages()}
    missing = sorted(f"tests/{name}/" for name in names if not (REPO / "tests" / name).is_dir())
    assert not missing, f"train/ has sub-packages with no test folder: create {missing}"
    folders = [d for d in (REPO / "tests").iterdir() if d.is_dir() and any(d.glob("test_*.py"))]
    extra = sorted(f"tests/{d.name}/" for d in folders if d.name not in names)
    assert not extra, f"test folders that mirror no sub-package of train/: {extra}"
