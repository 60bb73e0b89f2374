"""The package's shape: rooms by stage, each importing only the rooms below it, and no import cycle between
its modules, type-only imports included.

A cycle hidden behind `if TYPE_CHECKING:` still ties two modules together (neither can be read or moved
alone); imports inside functions may close one, as they defer heavy libraries on purpose. The room order
holds for every import, deferred ones included: a room that reaches up, even lazily, cannot be read alone.
"""

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "sdxl_ff"

# bottom to top; docs/architecture.md draws them in this order
ROOMS = ("runtime", "config", "model", "data", "objective", "optim", "plan", "checkpoint", "parallel", "eval",
         "export", "train", "inspector")


def module_name(path, package=PACKAGE) -> str:
    """'room.module' for package/room/module.py, 'room' for its __init__.py."""
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, package=PACKAGE, deferred: bool = False) -> set[str]:
    """The package modules `path` imports ('room.module'); at module level (including inside `if` blocks, such
    as TYPE_CHECKING), or anywhere with `deferred`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    if deferred:
        nodes = list(ast.walk(tree))
    else:
        nodes = []
        for node in tree.body:
            nodes += node.body if isinstance(node, ast.If) else [node]
    here = module_name(path, package).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    names = set()
    for node in nodes:
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
        elif node.module == package.name or (node.module or "").startswith(package.name + "."):
            base = node.module[len(package.name) + 1:]
        else:
            continue
        for alias in node.names:
            full = f"{base}.{alias.name}".strip(".")
            names.add(full if (package / (full.replace(".", "/") + ".py")).is_file() else base)
    return names


def import_graph(package, deferred: bool = False) -> dict[str, set[str]]:
    graph = {module_name(p, package): imports_of(p, package, deferred) for p in package.rglob("*.py")}
    return {module: {d for d in deps if d in graph and d not in ("", module)} for module, deps in graph.items()}


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


def upward_imports(graph: dict[str, set[str]], rooms: tuple[str, ...]) -> list[str]:
    """'a.x -> b.y' for each import of a room above the importer's own."""
    rank = {room: i for i, room in enumerate(rooms)}
    return sorted(f"{module} -> {dep}" for module, deps in graph.items() for dep in deps
                  if module and rank[dep.split(".")[0]] > rank[module.split(".")[0]])


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert {"config.load", "config.rules", "config.schema", "data.dataset", "data.records", "eval.validation"} <= \
        graph.keys()
    assert "config.schema" in graph["config.rules"] and "config.rules" in graph["config.load"]
    assert find_cycle(graph) == []


def test_every_module_lives_in_a_room_and_rooms_import_only_downward():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()) == \
        sorted(ROOMS)
    graph = import_graph(PACKAGE, deferred=True)
    assert "runtime.files" in graph["data.latent_cache"]  # the graph sees the rooms' imports
    assert upward_imports(graph, ROOMS) == []


def test_the_room_rule_finds_an_upward_import(tmp_path):
    package = tmp_path / "pkg"
    for room, text in {"low": "from pkg.high.b import B\n", "high": "from ..low.a import A\n"}.items():
        (package / room).mkdir(parents=True)
        (package / room / "__init__.py").write_text("")
        (package / room / ("a.py" if room == "low" else "b.py")).write_text(
            "def f():\n    " + text if room == "low" else text)
    graph = import_graph(package, deferred=True)
    assert graph["low.a"] == {"high.b"} and graph["high.b"] == {"low.a"}
    assert upward_imports(graph, ("low", "high")) == ["low.a -> high.b"]
    assert import_graph(package)["low.a"] == set()  # deferred: not a module-level import, so no cycle


def test_the_cycle_finder_finds_a_type_only_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from .b import B\n")
    (tmp_path / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .a import A\n")
    (tmp_path / "c.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def architecture_layout() -> tuple[list[str], set[str]]:
    """The rooms (in order) and modules ('room/name.py') docs/architecture.md's layout block lists: a room is a
    line `  room/   purpose` below `sdxl_ff/`, a module a line `    name.py   purpose` below its room."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("```", layout.index("```") + 3)]
    block = layout[layout.index("\nsdxl_ff/") + 1:]
    block = block[:re.search(r"^\S", block[block.index("\n"):], re.M).start() + block.index("\n")]
    rooms, modules, room = [], set(), None
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/ ", line):
            room = m.group(1)
            rooms.append(room)
        elif m := re.match(r"^    (\w+\.py) ", line):
            modules.add(f"{room}/{m.group(1)}")
    return rooms, modules


def test_architecture_lists_the_rooms_in_their_order_and_every_module():
    rooms, listed = architecture_layout()
    assert rooms == list(ROOMS)[::-1]  # drawn top to bottom
    present = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert len(listed) > 50  # the parse found the block
    assert sorted(present - listed) == []
    assert sorted(listed - present) == []


HEAVY = ("diffusers", "transformers")  # seconds of CPU to import, each


def heavy_imports_at_load(module: str) -> list[str]:
    """The modules `module` loads with it (module-level package imports, followed) that import a HEAVY library at
    module level themselves, as 'room.module: library'."""
    graph, seen, todo, found = import_graph(PACKAGE), set(), [module], []
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += graph.get(current, ())
        path = PACKAGE / (current.replace(".", "/") + ".py")
        tree = ast.parse((path if path.is_file() else path.with_suffix("") / "__init__.py").read_text())
        for node in tree.body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [f"{current}: {name}" for name in names if name.split(".")[0] in HEAVY]
    return sorted(found)


def test_the_data_room_loads_without_diffusers_or_transformers():
    """dataset.py, bench_startup.py's start-ups and spawned loader workers import the data room: the model it needs
    for the caches (the VAE's precision, the text encoders) is imported where the caches are built."""
    assert heavy_imports_at_load("data.dataset") == []
    assert heavy_imports_at_load("model.parts") == ["model.parts: diffusers", "model.parts: transformers"]  # found
