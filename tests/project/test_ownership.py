"""One owner per decision: the parallelism mode is decided once (sdxl_ff/parallel/strategy.py) and the config checks
its key (sdxl_ff/config/); nowhere else compares training.sharding or "fsdp2"."""

import ast
from collections.abc import Collection
from pathlib import Path

from conftest import ROOT

OWNERS = ("sdxl_ff/parallel/", "sdxl_ff/config/")


def sharding_comparisons(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line' of each comparison (==, !=, in, is) with an attribute named `sharding` or the string "fsdp2"."""
    def about_sharding(node: ast.expr) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "sharding") or \
            (isinstance(node, ast.Constant) and node.value == "fsdp2") or \
            (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(about_sharding, node.elts)))

    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"{path.relative_to(root)}:{line}" for line in sorted(
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and any(map(about_sharding, [node.left, *node.comparators])))]


def comparisons_outside_owners(root: Path) -> list[str]:
    files = [*sorted((root / "sdxl_ff").rglob("*.py")), root / "train_sdxl_ff.py", root / "sample.py"]
    return [hit for path in files if not str(path.relative_to(root)).startswith(OWNERS)
            for hit in sharding_comparisons(path, root)]


def test_only_the_parallelism_strategy_and_the_config_compare_the_sharding_mode():
    assert comparisons_outside_owners(ROOT) == []


def test_the_sharding_grep_names_file_and_line(tmp_path):
    (tmp_path / "sdxl_ff" / "parallel").mkdir(parents=True)
    (tmp_path / "sdxl_ff" / "train").mkdir()
    (tmp_path / "sdxl_ff" / "parallel" / "strategy.py").write_text('sharded = cfg.training.sharding == "fsdp2"\n')
    (tmp_path / "sdxl_ff" / "train" / "run.py").write_text(
        'x = 1\nif t.sharding != "none":\n    pass\nok = "fsdp2" in modes\nlog("sharding fsdp2")\n')
    (tmp_path / "train_sdxl_ff.py").write_text('keeps = main or cfg.training.sharding == "fsdp2"\n')
    (tmp_path / "sample.py").write_text('print("a sharded (fsdp2) checkpoint")\n')
    assert comparisons_outside_owners(tmp_path) == ["sdxl_ff/train/run.py:2", "sdxl_ff/train/run.py:4",
                                                    "train_sdxl_ff.py:1"]


# --------------------------------------------------------------------------- objects built once

def attribute_assignments(tree: ast.AST) -> list[tuple[ast.Attribute, int]]:
    """Every `x.attr = ...` (also in tuples, augmented and annotated) with its line."""
    found = []

    def targets(node: ast.expr) -> list[ast.expr]:
        return [t for e in node.elts for t in targets(e)] if isinstance(node, (ast.Tuple, ast.List)) else [node]

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            found += [(t, node.lineno) for target in node.targets for t in targets(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            found.append((node.target, node.lineno))
    return sorted(((t, line) for t, line in found if isinstance(t, ast.Attribute)), key=lambda hit: hit[1])


def assignments_onto(names: set[str], attrs: Collection[str], root: Path = ROOT, any_name: bool = False) -> list[str]:
    """'file:line name.attr' for each of `attrs` assigned onto a variable called one of `names` (`any_name`: any
    variable but `self`) in the trainer, the package, the benchmarks and the tests."""
    files = [root / "train_sdxl_ff.py", *sorted((root / "sdxl_ff").rglob("*.py")),
             *sorted((root / "benchmarks").glob("*.py")), *sorted((root / "tests").rglob("*.py"))]
    return [f"{path.relative_to(root)}:{line} {t.value.id}.{t.attr}" for path in files if path.is_file()
            for t, line in attribute_assignments(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(t.value, ast.Name) and t.attr in attrs
            and (t.value.id in names or (any_name and t.value.id != "self"))]


def self_assignments_outside_init(path: Path, class_name: str) -> list[str]:
    cls = next(n for n in ast.parse(path.read_text(encoding="utf-8")).body
               if isinstance(n, ast.ClassDef) and n.name == class_name)
    return [f"{class_name}.{f.name}:{line} self.{t.attr}" for f in cls.body
            if isinstance(f, ast.FunctionDef) and f.name != "__init__"
            for t, line in attribute_assignments(f) if isinstance(t.value, ast.Name) and t.value.id == "self"]


def test_the_run_is_built_in_one_constructor_with_real_types():
    import typing

    from sdxl_ff.train.run import Run
    hints = typing.get_type_hints(Run)
    assert len(hints) > 20 and [name for name, hint in hints.items() if hint is object] == []
    init = next(f for f in ast.parse((ROOT / "sdxl_ff" / "train" / "run.py").read_text()).body
                if isinstance(f, ast.ClassDef) and f.name == "Run").body
    init = next(f for f in init if isinstance(f, ast.FunctionDef) and f.name == "__init__")
    assigned = {t.attr for t, _ in attribute_assignments(init)
                if isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert assigned == hints.keys()  # every field, in the constructor
    assert self_assignments_outside_init(ROOT / "sdxl_ff" / "train" / "run.py", "Run") == []
    assert assignments_onto({"run"}, hints.keys()) == []


def test_the_assignment_scan_finds_a_field_set_after_construction(tmp_path):
    (tmp_path / "sdxl_ff").mkdir()
    (tmp_path / "train_sdxl_ff.py").write_text(
        "run = build_run()\nrun.memory_check, run.first_step = check, 0\nrun.validator = None\nrun.progress.x = 1\n")
    assert assignments_onto({"run"}, {"memory_check", "first_step", "validator", "x"}, tmp_path) == [
        "train_sdxl_ff.py:2 run.memory_check", "train_sdxl_ff.py:2 run.first_step", "train_sdxl_ff.py:3 run.validator"]


CACHE_FIELDS = {"latent_entries", "text_entries", "entries", "_entries", "caption_variants", "held_out", "max_pixels"}


def test_datasets_get_their_cache_entries_when_they_are_built():
    """No cache entry (nor another constructor argument) is assigned onto a dataset (10 on the tree before)."""
    assert assignments_onto(set(), CACHE_FIELDS, any_name=True) == []


def test_the_assignment_scan_finds_entries_assigned_onto_a_dataset(tmp_path):
    (tmp_path / "sdxl_ff" / "data").mkdir(parents=True)
    (tmp_path / "sdxl_ff" / "data" / "caches.py").write_text(
        "for dataset in also:\n    dataset.latent_entries = report.entries\ntrain_set.caption_variants = 3\n")
    (tmp_path / "sdxl_ff" / "data" / "dataset.py").write_text(
        "class D:\n    def __init__(self):\n        self._entries = None\n")
    assert assignments_onto(set(), CACHE_FIELDS, tmp_path, any_name=True) == [
        "sdxl_ff/data/caches.py:2 dataset.latent_entries", "sdxl_ff/data/caches.py:3 train_set.caption_variants"]
