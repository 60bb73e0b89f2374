"""The package's shape: its modules import each other without a cycle, type-only imports included.

A cycle hidden behind `if TYPE_CHECKING:` still ties two modules together (neither can be read or moved
alone); imports inside functions are allowed to close one, as they defer heavy libraries on purpose.
"""

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "sdxl_ff"


def imports_of(path) -> set[str]:
    """The package modules `path` imports at module level, including inside `if` blocks (TYPE_CHECKING)."""
    nodes = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        nodes += node.body if isinstance(node, ast.If) else [node]
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("sdxl_ff."):
                names.add(node.module.split(".")[1])
            elif node.module == "sdxl_ff":
                names.update(a.name for a in node.names)
    return names


def import_graph(folder) -> dict[str, set[str]]:
    graph = {path.stem: imports_of(path) for path in folder.glob("*.py")}
    return {module: {d for d in deps if d in graph and d not in ("__init__", module)} for module, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert {"config", "config_rules", "config_schema", "data", "records", "validation"} <= graph.keys()
    assert "config_schema" in graph["config_rules"] and "config_rules" in graph["config"]
    assert find_cycle(graph) == []


def test_the_cycle_finder_finds_a_type_only_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import B\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def architecture_modules() -> set[str]:
    """The modules docs/architecture.md's layout block lists: lines `  name.py   purpose` (two spaces in)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    return set(re.findall(r"^  (\w+\.py) ", layout, re.M))


def test_architecture_lists_every_module():
    listed = architecture_modules()
    missing = [p.name for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__" and p.name not in listed]
    assert missing == []


def test_architecture_lists_no_stale_module():
    listed = architecture_modules()
    assert len(listed) > 40  # the parse found the block
    assert sorted(name for name in listed if not (PACKAGE / name).is_file()) == []
