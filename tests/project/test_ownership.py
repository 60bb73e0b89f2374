"""One owner per decision: the parallelism mode is decided once (sdxl_ff/parallel/strategy.py) and the config checks
its key (sdxl_ff/config/); nowhere else compares training.sharding or "fsdp2"."""

import ast
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
