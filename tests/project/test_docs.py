"""Every relative link in README.md and docs/*.md leads somewhere: the file exists, and an anchor names a heading
(by GitHub's rules) or an explicit `<a id>` of that file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Generated from the config schema by `python -m sdxl_ff.config.reference` (its own test keeps it current); until
# that page is committed, links to it are not checked for existence.
GENERATED = {ROOT / "docs" / "configuration.md"}
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def prose(text: str) -> str:
    """The page without fenced code blocks and inline code, where brackets are code, not links."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: lower case, punctuation but `-` and `_` dropped, each space a hyphen."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = github_anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found | set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text(encoding="utf-8"))) if not re.match(r"[a-z]+:", t)]


def test_anchor_rules():
    assert github_anchor("Render a sample: `sample.py`") == "render-a-sample-samplepy"
    assert github_anchor("Sharding the model over several GPUs (`training.sharding: \"fsdp2\"`)") == (
        "sharding-the-model-over-several-gpus-trainingsharding-fsdp2")
    assert github_anchor("Use in ComfyUI (and A1111, Forge)") == "use-in-comfyui-and-a1111-forge"
    assert github_anchor("Training under WSL2 (Windows)") == "training-under-wsl2-windows"


def test_pages_have_links():
    """The checker sees links at all (a broken pattern would pass every page vacuously)."""
    assert len(links(ROOT / "README.md")) >= 10
    assert "docs/architecture.md" in links(ROOT / "README.md")


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if dest in GENERATED and not dest.exists():
            continue
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading or <a id> '{anchor}' in {dest.name}")
    return broken


def test_broken_links_are_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Fitting in 24 GB (`--plan`)\n<a id=\"table\"></a>\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#fitting-in-24-gb---plan) [ok](other.md#table) [ok](#page)\n"
                    "[gone](missing.md) [no heading](other.md#fitting) [self](#nowhere)\n"
                    "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)` [web](https://example.com/x.md)\n")
    assert broken_links(page) == ["missing.md: no such file",
                                  "other.md#fitting: no heading or <a id> 'fitting' in other.md",
                                  "#nowhere: no heading or <a id> 'nowhere' in page.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []
