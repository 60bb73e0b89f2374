"""The configuration reference, docs/configuration.md, generated from config_schema's declarations.

One table per section, keys in declaration order: the default as JSON, the allowed values in the validator's
own words (config_types), and the key's `help=` text. After changing a key, run
`python -m sdxl_ff.config.reference` from the repository root; tests/config/test_config_reference.py fails while the
committed page differs from what this module renders.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdxl_ff.config.schema import Config
from sdxl_ff.config.value_checks import bounds_text, dataclass_of, expected_type

PAGE = Path("docs") / "configuration.md"
COMMAND = "python -m sdxl_ff.config.reference"

INTRO = f"""\
# Configuration reference

Generated from `sdxl_ff/config/schema.py` by `{COMMAND}`: edit the schema's `help=` texts, not this page.

`config.json` is a complete starting config for SDXL base 1.0; the tables give each key's default, the value used
when the key is left out (`config.json` sets some differently, e.g. `grad_accum_steps`). Relative paths are
resolved from the folder you run the command in, not the config file's folder. `--set section.key=value`
(repeatable) overrides one key; the value is JSON, or a plain string.

Every key is checked at start-up, before torch and the model libraries are imported, and all problems are
reported at once: an unknown key gets a "did you mean", a wrong type or range names the key, the value and what
is allowed (the *allowed* column, in the same words), and contradictory settings are refused with the reason; a
key that would be silently ignored (e.g. `training.lr_scheduler.cycle_steps` without `cosine_restarts`) is refused
too. A key written twice in the file (JSON would keep the last) is an error naming its path. Numbers must be
finite: `NaN` and `Infinity` are refused for every key. The file is UTF-8 JSON; a byte-order mark is ignored. The
one exception is a key that is harmless where it has no effect (a frozen text encoder's `lr_text_encoder_N`,
`data.text_embedding_cache.variants` with the cache off): it is logged as a warning.

A saved config (`sdxl_ff_config.json`, in every output) also carries `format_version`; it may be given as
`--config`, and one written by a newer sdxl-ff is refused.
"""


def sections(cls: type = Config, path: str = "") -> Iterator[tuple[str, type]]:
    """(dotted path, section class) of every section, depth first in declaration order; "" is the top level."""
    yield path, cls
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        sub = dataclass_of(hints[f.name])
        if sub is not None:
            inner = f"{path}.{f.name}" if path else f.name
            yield from sections(sub, inner + "[]" if typing.get_origin(hints[f.name]) is list else inner)


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The keys a user may write in section `cls` (not the loader's own bookkeeping)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def default_cell(f: dataclasses.Field, tp: Any, path: str) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(value):  # a section: its keys' defaults are its own table's
        return f"table `{path}.{f.name}`" if path else f"table `{f.name}`"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def allowed_cell(f: dataclasses.Field, tp: Any) -> str:
    bounds = bounds_text(f.metadata)
    return expected_type(tp) + (f"; {bounds}" if bounds else "")


def cell(text: str) -> str:
    """Text safe inside one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def section_markdown(path: str, cls: type) -> str:
    doc = cls.__doc__ or ""
    generated = doc.startswith(f"{cls.__name__}(")  # dataclass() writes the signature when there is no docstring
    lines = [f"## {f'`{path}`' if path else 'top level'}", ""]
    if doc and not generated:
        lines += [" ".join(doc.split()), ""]
    lines += ["| key | default | allowed | what it does |", "|---|---|---|---|"]
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        tp = hints[f.name]
        row = [f"`{f.name}`", default_cell(f, tp, path), allowed_cell(f, tp), f.metadata.get("help") or ""]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The whole page: the introduction, then one table per section."""
    return "\n".join([INTRO] + [section_markdown(path, cls) for path, cls in sections()])


def main() -> None:
    from sdxl_ff.runtime.files import write_atomic  # state.py imports torch; rendering the page does not need it

    text = reference_markdown()
    write_atomic(PAGE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    print(f"wrote {PAGE} ({len(text.splitlines())} lines)")


if __name__ == "__main__":
    main()
