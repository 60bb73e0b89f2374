"""The configuration reference, docs/configuration.md: generated from config_schema, never stale, every key in it."""

import dataclasses
import re
import subprocess
import sys
import typing

from conftest import ROOT

from sdxl_ff.config import reference as config_reference
from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import load_config
from sdxl_ff.config.reference import COMMAND, PAGE, reference_markdown
from sdxl_ff.config.schema import Config

CELL = re.compile(r"(?:\\\||[^|])+")  # a table cell: anything but an unescaped "|"


def tables(page: str) -> dict[str, dict[str, list[str]]]:
    """{section heading: {key: [default, allowed, what it does]}} of every table on the page."""
    result: dict[str, dict[str, list[str]]] = {}
    heading = None
    for line in page.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            result[heading] = {}
        elif line.startswith("| `") and heading is not None:
            cells = [c.strip() for c in CELL.findall(line.strip()[1:-1])]
            assert len(cells) == 4, line
            result[heading][cells[0].strip("`")] = cells[1:]
    return result


def schema_keys(cls: type = Config, path: str = "") -> dict[str, list[str]]:
    """{section heading: its keys}, walking the dataclasses themselves (not the generator's walk)."""
    heading = f"`{path}`" if path else "top level"
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    found = {heading: [f.name for f in fields]}
    for f in fields:
        tp = hints[f.name]
        sub = next((t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)), None)
        f_path = f"{path + '.' if path else ''}{f.name}" + ("[]" if typing.get_origin(tp) is list else "")
        if sub is not None:
            found.update(schema_keys(sub, f_path))
    return found


def test_the_committed_page_is_what_the_schema_renders():
    committed = (ROOT / PAGE).read_text(encoding="utf-8")
    assert committed == reference_markdown(), f"{PAGE} is stale: run `{COMMAND}` from the repository root and commit it"
    assert committed.splitlines()[2].startswith(f"Generated from `sdxl_ff/config/schema.py` by `{COMMAND}`")


def test_every_key_of_every_section_is_on_the_page_with_a_help_text():
    page, keys = tables(reference_markdown()), schema_keys()
    assert list(page) == list(keys)  # the same sections, in declaration order
    assert len(keys) == 18 and sum(map(len, keys.values())) == 163
    for heading, names in keys.items():
        assert list(page[heading]) == names, heading  # every key, in declaration order, nothing else
        for name in names:
            default, allowed, help_text = page[heading][name]
            assert default and allowed and len(help_text) > 10, (heading, name)


def test_rows_in_closed_form():
    page = reference_markdown()
    assert ("| `noise_offset` | `0.0` | a number; >= 0 and <= 1 | offset noise, so the model can learn overall "
            "brightness and colour:") in page
    t = tables(page)
    assert t["`training`"]["timestep_sampling"][:2] == ['`"uniform"`', 'one of "uniform", "logit_normal", "mode"']
    assert t["`training`"]["seed"][:2] == ["`null`", "an integer or null; >= 0 and < 4294967296"]
    assert t["`model`"]["ema_decay"][:2] == ["`0.9999`", "a number; > 0 and < 1"]
    assert t["`training`"]["lr_scheduler"][:2] == ["`null`", "an object or null"]
    assert t["`data`"]["bucket"][:2] == ["table `data.bucket`", "an object"]
    assert t["`data.bucket`"]["resolutions"][0] == "`[[1024, 1024], [896, 1152], [1152, 896]]`"
    assert t["`training`"]["logit_mean"][2].startswith("logit_normal") and "\\|mean\\| = 10" in page
    assert set(t["`eval.live`"]) == set(t["`eval.final`"]) == {"enabled", "every_n_steps", "max_batches"}


def test_the_allowed_column_words_bounds_as_the_validator_does(tmp_path):
    for key, value, allowed in (("training.noise_offset", 2, ">= 0 and <= 1"),
                                ("training.logit_std", 0, "> 0 and <= 10"),
                                ("validation.split", 1, "> 0 and < 1")):
        try:
            load_config(None, [f"{key}={value}", "training.num_steps=1", "run.name=r"])
        except ConfigError as e:
            assert f"{key}: {value} is out of range; allowed: {allowed}" in str(e)
        else:
            raise AssertionError(f"{key}={value} was accepted")
        section, name = key.rsplit(".", 1)
        assert tables(reference_markdown())[f"`{section}`"][name][1].endswith(f"; {allowed}")


def test_main_writes_the_page_atomically_from_the_repository_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / PAGE).write_text("stale\n", encoding="utf-8")
    config_reference.main()
    assert (tmp_path / PAGE).read_text(encoding="utf-8") == reference_markdown()
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["configuration.md"]  # no temporary left
    assert f"wrote {PAGE}" in capsys.readouterr().out


def test_rendering_the_page_imports_no_torch():
    code = "import sys, sdxl_ff.config.reference as r; r.reference_markdown(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
