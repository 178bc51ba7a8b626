"""`chatstream --help` works for every command, and the README's option lists say what `--help` says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CHATSTREAM = str(Path(sys.executable).with_name("chatstream"))
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def run_help(*command: str) -> str:
    proc = subprocess.run([CHATSTREAM, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def help_flags(text: str) -> set[str]:
    """The long options of a --help text: its option lines are indented by exactly two spaces."""
    flags: set[str] = set()
    for line in text.splitlines():
        if re.match(r"^  -", line):
            invocation = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
            flags.update(re.findall(r"--[a-z0-9][a-z0-9-]*", invocation))
    return flags - {"--help"}


def readme_section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_flags() -> set[str]:
    """The flags in the first column of the Configuration table (`--mock / --no-mock` is two)."""
    flags: set[str] = set()
    for line in readme_section("Configuration").splitlines():
        if line.startswith("| `--"):
            flags.update(re.findall(r"--[a-z0-9][a-z0-9-]*", line.split("|")[1]))
    return flags


def commands() -> list[str]:
    listed = re.search(r"\{([a-z,]+)\}", run_help())
    assert listed, "chatstream --help lists no commands"
    return listed.group(1).split(",")


def test_the_top_level_help_lists_the_commands():
    assert set(commands()) == {"serve", "chat"}


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_every_command_has_a_working_help(command):
    assert command in commands()
    text = run_help(command)
    assert text.startswith(f"usage: chatstream {command}")
    assert "--kv-cache-mb" in text and "50%" in text  # the description with a percent sign that broke argparse


def test_serve_help_and_the_configuration_table_list_the_same_options():
    in_help, in_table = help_flags(run_help("serve")), table_flags()
    assert in_help - in_table == set(), "in `serve --help` but not in the README's Configuration table"
    assert in_table - in_help == set(), "in the README's Configuration table but not in `serve --help`"


def test_chat_help_options_are_all_documented_and_exist():
    in_help = help_flags(run_help("chat"))
    console = set(re.findall(r"`[^`]*?(--[a-z0-9][a-z0-9-]*)", readme_section("Console chat")))
    assert in_help - table_flags() == console - table_flags(), "chat's own options vs the Console chat section"
    assert console <= in_help, "the Console chat section names an option `chat --help` does not have"
