"""The README stays true: its quick start has exactly two commands and every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

from chatstream.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_quick_start_is_two_commands():
    quick_start = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quick_start.strip().splitlines()]
    assert commands == ["make serve", "make test"]


def test_every_setting_is_in_the_configuration_table_with_its_default():
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for name, field in Settings.model_fields.items():
        flag, env = "--" + name.replace("_", "-"), f"CHATSTREAM_{name.upper()}"
        row = next((line for line in table.splitlines() if f"`{flag}" in line and f"`{env}`" in line), None)
        assert row is not None, f"{flag} is not documented"
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, [], "") else (str(default).lower() if isinstance(default, bool) else str(default))
        assert re.search(rf"\|\s*{re.escape(shown)}\s*\|", row), (flag, shown, row)
