"""README's two set-up commands are exactly what CI runs."""

import re

from conftest import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quickstart)


def test_ci_runs_readme_commands_verbatim():
    commands = readme_commands()
    assert len(commands) == 2
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci_lines, command


def test_quickstart_config_exists():
    assert "--config configs/quickstart.json" in readme_commands()[0]
    assert (ROOT / "configs" / "quickstart.json").is_file()
