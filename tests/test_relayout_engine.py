"""tools/relayout_engine.py, run on a scratch copy of this checkout: every engine file lands where its
table says, the result imports, lints and ships its C sources, and a tree it does not know is refused
untouched. (The script removes itself and this test when it runs for real: the move is done once.)"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "relayout_engine.py"
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", "-c", "commit.gpgsign=false"]


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relayout_engine", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


relayout = load_script()


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """This checkout's tracked files, as they are in the working tree, committed in a fresh repository."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "before the move")
    return repo


def run_script(repo: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "relayout_engine.py"  # from outside: the script removes its copy in the repository
    shutil.copy2(SCRIPT, script)
    return subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})


def test_every_engine_file_moves_to_its_row_and_the_result_imports_lints_and_ships(repo: Path, tmp_path: Path) -> None:
    engine = repo / relayout.ENGINE
    moves = {old: new for old, new in relayout.MOVES.items() if (engine / old).exists()}
    assert set(relayout.MOVES) - set(moves) <= relayout.FROM_BRANCHES
    done = run_script(repo, tmp_path)
    assert done.returncode == 0, done.stderr
    for old, new in moves.items():
        assert (engine / new).is_file(), new
        if old != new:
            assert not (engine / old).exists(), old
    for package in relayout.PACKAGES:
        assert (engine / package / "__init__.py").is_file()
    assert not (repo / "tools" / "relayout_engine.py").exists() and not (repo / "tests" / "test_relayout_engine.py").exists()
    status = git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    assert status and [line for line in status if line[1] != " "] == [], "everything is staged for the lead to commit"

    # No old module name or engine path is left anywhere but in the measurements of past commits.
    old_names = [old.removesuffix(".py").replace("/", ".") for old, new in moves.items()
                 if old != new and old.endswith(".py")]
    new_names = [new.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for new in moves.values()]

    def still_old(name: str) -> str:
        """`ops` was a module and is now a package: only a name below it that is none of its modules is stale."""
        below = [n.split(".", 1)[1] for n in new_names if n.startswith(f"{name}.")]
        return re.escape(name) + (r"(?=\.)(?!\.(" + "|".join(below) + r")\b)" if below else "")

    stale = re.compile(r"chatstream\.engine\.(" + "|".join(map(still_old, old_names)) + r")(?![\w])")
    old_paths = re.compile(r"(?<![\w.-])engine/(" + "|".join(re.escape(old) for old, new in moves.items()
                                                             if old != new) + r")(?![\w/])")
    left = []
    for name in git(repo, "ls-files").split():
        if name in relayout.UNTOUCHED or not (repo / name).is_file():
            continue
        try:
            text = (repo / name).read_text()
        except UnicodeDecodeError:
            continue
        left += [f"{name}: {m.group(0)}" for pattern in (stale, old_paths) for m in pattern.finditer(text)]
    assert left == []

    # The result lints, and every module imports at its new place; what users import still works.
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=repo,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    probe = """
import importlib, pkgutil
import chatstream.engine as engine
names = [m.name for m in pkgutil.walk_packages(engine.__path__, "chatstream.engine.")]
for name in names:
    importlib.import_module(name)
from chatstream import ChatService, ChatStream, Settings, load_model
from chatstream.engine import Engine, GenerationOutput, LLMEngine, SamplingParams
from chatstream.engine.ops import native
print(len(names), LLMEngine.__module__, native.SOURCE.relative_to(native.SOURCE.parents[2]), [h.name for h in native.HEADERS])
"""
    imported = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(repo / "src")}, timeout=120)
    assert imported.returncode == 0, imported.stderr
    count, module, source, headers = imported.stdout.split(maxsplit=3)
    modules = sum(1 for new in moves.values() if new.endswith(".py")) - 1  # less engine/__init__.py itself
    assert int(count) == modules + len(relayout.PACKAGES)
    ops_headers = sorted(PurePosixPath(new).name for new in moves.values() if new.startswith("ops/") and new.endswith(".h"))
    assert (module, source, headers.strip()) == ("chatstream.engine.core.llm_engine", "engine/ops/kernels.c", str(ops_headers))

    # The wheel's package-data names every C source and header at its new place, and the C includes resolve.
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["chatstream"]
    package = repo / "src" / "chatstream"
    native_files = [p.relative_to(package).as_posix() for ext in ("*.c", "*.h") for p in package.rglob(ext)]
    assert len(native_files) == sum(1 for new in moves.values() if new.endswith((".c", ".h")))
    assert [f for f in native_files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    for source in package.rglob("*.c"):
        for include in re.findall(r'#include\s+"([^"]+)"', source.read_text()):
            assert (source.parent / include).is_file(), (source, include)

    # Run again on the committed result: refused, nothing changed.
    git(repo, "commit", "-qm", "the move")
    again = run_script(repo, tmp_path)
    assert again.returncode == 1 and "done already" in again.stderr
    assert git(repo, "status", "--porcelain") == ""


def test_a_file_the_table_does_not_list_stops_the_move_before_anything_changes(repo: Path, tmp_path: Path) -> None:
    (repo / relayout.ENGINE / "new_kernel.c").write_text("/* a parallel branch's new kernel */\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a new engine file")
    (repo / relayout.ENGINE / "grammar.py").rename(repo / "grammar.py")  # and a listed one gone
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a moved engine file")
    head = git(repo, "rev-parse", "HEAD")

    done = run_script(repo, tmp_path)
    assert done.returncode == 1
    assert "not in the table: new_kernel.c" in done.stderr and "not in the tree: grammar.py" in done.stderr
    assert git(repo, "status", "--porcelain") == "" and git(repo, "rev-parse", "HEAD") == head


def test_a_dirty_tree_is_refused(repo: Path, tmp_path: Path) -> None:
    (repo / "README.md").write_text((repo / "README.md").read_text() + "\nan edit not committed yet\n")
    done = run_script(repo, tmp_path)
    assert done.returncode == 1 and "uncommitted" in done.stderr
    assert git(repo, "status", "--porcelain").split() == ["M", "README.md"]


def test_a_branchs_file_with_a_row_moves_too_its_include_and_import_follow(repo: Path, tmp_path: Path) -> None:
    """Rows for files a parallel branch adds (FROM_BRANCHES) apply once the branch is merged (here a
    stand-in for s4batch's sampler kernel, unless the checkout has the real one)."""
    engine = repo / relayout.ENGINE
    stand_ins = {"sampling.c": '#include "vector_math.h"\n', "sampling_native.py": "from . import native\n\nBUILD = native.build\n"}
    for name, text in stand_ins.items():
        assert name in relayout.FROM_BRANCHES
        if not (engine / name).exists():
            (engine / name).write_text(text)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a branch's sampler kernel", "--allow-empty")

    done = run_script(repo, tmp_path)
    assert done.returncode == 0, done.stderr
    source = (engine / "core" / "sampling.c").read_text()
    assert re.findall(r'#include\s+"([^"]+)"', source) == ["../ops/vector_math.h"]
    assert "from ..ops import native\n" in (engine / "core" / "sampling_native.py").read_text()
    assert '"engine/core/*.c"' in (repo / "pyproject.toml").read_text()
    assert "`sampling_native`, `sampling.c`" in (repo / "README.md").read_text()
