"""Move the engine's modules into the packages docs/ARCHITECTURE.md names, once, mechanically.

    python tools/relayout_engine.py          # from anywhere inside a clean checkout

``engine/core/`` (the continuous-batching loop), ``engine/model/`` (how a step runs the model),
``engine/ops/`` (the ops the fused forward calls, the C kernels and their build), ``engine/quant/``
(weight formats), ``engine/remote/`` (the remote engine); the engine interface and the mock engine
stay in ``engine/``. :data:`MOVES` is the whole mapping, one row a file. The script:

1. refuses to run on a dirty tree, on a tree already moved, and on any file under
   ``src/chatstream/engine/`` that :data:`MOVES` does not list (or a listed one that is gone): a file
   a parallel branch added must be given a place in the table, not left behind;
2. computes every rewrite in memory before touching anything, then ``git mv``s each file, writes the
   packages' ``__init__.py`` and rewrites, in every tracked text file but :data:`UNTOUCHED`:
   - imports, through Python's ``ast``: a relative import is resolved against the file's old place
     and written again from its new one (``from .native import X`` in ``ops.py`` -> ``from .native
     import X`` in ``ops/layer_ops.py``; ``from ..model_loader`` one level deeper -> ``...``); ``from
     <package> import <module>, ...`` is split by the modules' new packages (a renamed module keeps
     its old name with ``as``);
   - dotted names ``chatstream.engine.<module>`` anywhere (absolute imports, logger names, docs);
   - relative Sphinx references in docstrings (``:mod:`.native```, ``:class:`~.formats.X```);
   - paths ``engine/<file>`` (README, docs, comments) and ``#include "..."`` between the C files;
   - ``pyproject.toml``'s package-data globs for the C sources and headers (from their new places);
   - the README's layout table row for the engine (generated from :data:`MOVES`) and the few
     sentences in :data:`TEXT_RULES` (a sentence not found is reported, not fatal);
3. sorts the touched imports with ruff (``--select I --fix``), stages everything (``git add``) and
   removes itself and its test: the move is done once, and the table names paths that no longer
   exist. The lead commits the result.

Nothing else changes: no code but imports and paths, so the move changes no behaviour.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

ENGINE = "src/chatstream/engine"

# Every file under src/chatstream/engine/, old path -> new path (relative to engine/). Why each goes
# where it goes is what the module is:
MOVES: dict[str, str] = {
    # The engine interface every engine implements and every face uses, and the model-free engine.
    "__init__.py": "__init__.py",
    "protocol.py": "protocol.py",  # Engine, GenerationOutput, EngineInfo
    "sampling_params.py": "sampling_params.py",  # SamplingParams, validated at the edge
    "stream.py": "stream.py",  # RequestStream: the event-loop side of a request, for all three engines
    "mock.py": "mock.py",  # MockEngine, MockTokenizer (`serve --mock`)
    # core/: the continuous-batching loop: what runs each step, and what becomes of its logits.
    "llm_engine.py": "core/llm_engine.py",  # the worker thread's loop
    "scheduler.py": "core/scheduler.py",
    "block_manager.py": "core/block_manager.py",  # KV block ownership and the prefix cache
    "sequence.py": "core/sequence.py",
    "sampler.py": "core/sampler.py",
    "sampling_native.py": "core/sampling_native.py",  # s4batch: the sampler's C kernel, built like ops/native's
    "sampling.c": "core/sampling.c",
    "grammar.py": "core/grammar.py",  # llguidance token masks applied before sampling
    "detokenizer.py": "core/detokenizer.py",
    "stop_strings.py": "core/stop_strings.py",
    # model/: how one step runs the model: backend choice, the runner, the forwards, batch and cache.
    "backend.py": "model/backend.py",  # Backend, select_backend: chosen once
    "model_runner.py": "model/runner.py",  # ModelRunner, attention_shape, kv_bytes_per_token
    "llama.py": "model/llama.py",  # the fused Llama forward, written against the ops
    "attention.py": "model/attention.py",  # BatchMetadata, PagedKVCache, transformers' attention plug-in
    # ops/: the ops the fused forward calls, chatstream's C kernels and their build.
    "ops.py": "ops/layer_ops.py",  # TorchOps, NativeOps
    "native.py": "ops/native.py",  # build (compile + cache key), load, NativeKernels
    "kernels.c": "ops/kernels.c",
    "vector_math.h": "ops/vector_math.h",  # included by ops/kernels.c and quant/kernels.c
    "thread_pool.h": "ops/thread_pool.h",  # s4attn: the process's one pool, for ops/ and quant/ kernels
    # quant/: weight formats and their kernels.
    "quantization.py": "quant/int8.py",  # Int8Linear (per-token int8), resolve_quantization
    "quant/__init__.py": "quant/__init__.py",
    "quant/formats.py": "quant/formats.py",
    "quant/gguf_model.py": "quant/gguf_model.py",
    "quant/native.py": "quant/native.py",
    "quant/kernels.c": "quant/kernels.c",
    # remote/: generation on OpenAI-compatible upstreams.
    "remote.py": "remote/engine.py",  # RemoteEngine: upstream client, routing, health
    "remote_tokenizer.py": "remote/tokenizer.py",  # token counting for truncation
}

# Rows for files that parallel branches add, not merged everywhere yet: one absent is no error.
FROM_BRANCHES = {"thread_pool.h", "sampling_native.py", "sampling.c"}

# The new packages' __init__.py (quant/ has one already).
PACKAGES: dict[str, str] = {
    "core": "The continuous-batching loop: scheduling, KV blocks, sequences, sampling, detokenizing, stop strings.",
    "model": "How a step runs the model: the backend chosen once, the runner, the forwards, the batch and the KV cache.",
    "ops": "The ops the fused forward is written against, chatstream's C kernels and their build.",
    "remote": "An engine that generates on OpenAI-compatible upstreams, and the token counting it needs.",
}

# What each package holds, for the README's layout table (its modules are listed from MOVES).
LAYOUT_ROWS: dict[str, str] = {
    "": "the engine interface and the mock engine",
    "core": "the continuous-batching engine",
    "model": "how a step runs the model: the backend (chosen once), the runner, the fused Llama forward, "
             "the batch layout, the paged KV cache and transformers' attention plug-in",
    "ops": "the ops the fused forward calls, the C kernels and their build",
    "quant": "weight formats: int8 linears, GGUF blocks as stored, their kernels",
    "remote": "the remote engine (OpenAI-compatible upstreams) and its token counting",
}

# Files left as they are: measurements recorded at past commits name the paths of their commit.
UNTOUCHED = {"benchmarks/RESULTS.md", "tools/relayout_engine.py", "tests/test_relayout_engine.py"}

# Sentences that only a person could rewrite, as exact (file, old, new) text. One not found (someone
# reworded it) is reported at the end and the move goes on.
TEXT_RULES: list[tuple[str, str, str]] = [
    ("README.md",
     " (Left for later: the engine files could move into `engine/core/`,\n  `engine/model/`, `engine/ops/` subpackages.)",
     ""),
    ("docs/ARCHITECTURE.md", "Suggested layout: `engine/core/`", "Layout: `engine/core/`"),
    (f"{ENGINE}/quant/kernels.c", "compiled at first use like ../kernels.c:", "compiled at first use like ../ops/kernels.c:"),
]

SELF = ["tools/relayout_engine.py", "tests/test_relayout_engine.py"]


class RelayoutError(RuntimeError):
    """The tree is not one this script knows how to move; nothing was changed."""


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RelayoutError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def module_name(path: str) -> tuple[list[str], bool]:
    """``src/chatstream/engine/ops.py`` -> (["chatstream", "engine", "ops"], False); packages' own
    module is their __init__.py (True). Files outside src/ are named from the repository root."""
    parts = list(PurePosixPath(path).with_suffix("").parts)
    if parts[0] == "src":
        parts = parts[1:]
    if parts[-1] == "__init__":
        return parts[:-1], True
    return parts, False


def package_of(path: str) -> list[str]:
    parts, is_package = module_name(path)
    return parts if is_package else parts[:-1]


def render_relative(target: list[str], package: list[str]) -> str:
    """The relative name of module ``target`` seen from inside ``package`` (``..ops.native``)."""
    common = 0
    while common < min(len(target), len(package)) and target[common] == package[common]:
        common += 1
    return "." * (len(package) - common + 1) + ".".join(target[common:])


@dataclass
class Plan:
    root: Path
    moves: dict[str, str] = field(default_factory=dict)  # the rows of MOVES whose file is in this tree
    modules: dict[str, str] = field(default_factory=dict)  # old dotted -> new dotted, every engine module
    moved_modules: dict[str, str] = field(default_factory=dict)  # only those whose name changes
    known_modules: set[str] = field(default_factory=set)  # every module under src/ (before the move)
    paths: dict[str, str] = field(default_factory=dict)  # old repo path -> new repo path, moved files
    contents: dict[str, str] = field(default_factory=dict)  # new repo path -> new text, files that change
    warnings: list[str] = field(default_factory=list)

    def new_module(self, old: list[str]) -> list[str]:
        """The new name of a module, or of a name inside one (longest known module prefix)."""
        for cut in range(len(old), 0, -1):
            prefix = ".".join(old[:cut])
            if prefix in self.modules:
                return self.modules[prefix].split(".") + old[cut:]
            if prefix in self.known_modules:
                return old
        return old


def check_tree(root: Path) -> list[str]:
    if git(root, "status", "--porcelain", "--untracked-files=normal").strip():
        raise RelayoutError("the working tree has uncommitted changes or untracked files: commit them first")
    engine_files = [line[len(ENGINE) + 1:] for line in git(root, "ls-files", ENGINE).splitlines()]
    if "llm_engine.py" not in engine_files and "core/llm_engine.py" in engine_files:
        raise RelayoutError(f"{ENGINE}/core/llm_engine.py exists: the move was done already")
    unknown = sorted(set(engine_files) - set(MOVES))
    missing = sorted(set(MOVES) - set(engine_files) - FROM_BRANCHES)
    if unknown or missing:
        raise RelayoutError(
            "the engine's files differ from the table MOVES in tools/relayout_engine.py; give each a place there"
            + (f"\n  not in the table: {', '.join(unknown)}" if unknown else "")
            + (f"\n  in the table but not in the tree: {', '.join(missing)}" if missing else ""))
    return git(root, "ls-files").splitlines()


def make_plan(root: Path) -> Plan:
    tracked = check_tree(root)
    plan = Plan(root)
    for path in tracked:
        if path.startswith("src/") and path.endswith(".py"):
            plan.known_modules.add(".".join(module_name(path)[0]))
    for old, new in MOVES.items():
        old_path, new_path = f"{ENGINE}/{old}", f"{ENGINE}/{new}"
        if old_path not in tracked:
            continue  # a row of FROM_BRANCHES whose branch is not merged here
        plan.moves[old] = new
        if old != new:
            plan.paths[old_path] = new_path
        if old.endswith(".py"):
            old_mod, new_mod = ".".join(module_name(old_path)[0]), ".".join(module_name(new_path)[0])
            plan.modules[old_mod] = new_mod
            if old_mod != new_mod:
                plan.moved_modules[old_mod] = new_mod

    for path in tracked:
        if path in UNTOUCHED:
            continue
        try:
            text = (root / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError):
            continue  # images, fonts
        new_path = plan.paths.get(path, path)
        new_text = rewrite_text(plan, path, new_path, text)
        if path.endswith(".py"):
            new_text = rewrite_python(plan, path, new_path, new_text)
        if path.endswith((".c", ".h")) and path.startswith(ENGINE):
            new_text = rewrite_includes(plan, path, new_path, new_text)
        if path == "pyproject.toml":
            new_text = rewrite_package_data(plan, new_text)
        if path == "README.md":
            new_text = rewrite_layout_table(plan, new_text)
        for file, old, new in TEXT_RULES:
            if file == path:
                if old in new_text:
                    new_text = new_text.replace(old, new)
                else:
                    plan.warnings.append(f"{path}: text not found, not rewritten: {old.strip()[:70]!r}")
        if new_text != text or new_path != path:
            plan.contents[new_path] = new_text
    return plan


def rewrite_text(plan: Plan, path: str, new_path: str, text: str) -> str:
    """Dotted module names and ``engine/<file>`` paths, in any text file."""
    if plan.moved_modules:
        names = sorted((old.removeprefix("chatstream.engine.") for old in plan.moved_modules), key=len, reverse=True)
        dotted = re.compile(r"(?<![\w.])chatstream\.engine\.(" + "|".join(map(re.escape, names)) + r")(?![\w])")
        text = dotted.sub(lambda m: plan.moved_modules[f"chatstream.engine.{m.group(1)}"], text)
    files = sorted((old[len(ENGINE) + 1:] for old in plan.paths), key=len, reverse=True)
    if not files:
        return text
    path_re = re.compile(r"(?<![\w.-])engine/(" + "|".join(map(re.escape, files)) + r")(?![\w/])")
    return path_re.sub(lambda m: "engine/" + plan.paths[f"{ENGINE}/{m.group(1)}"][len(ENGINE) + 1:], text)


_DOC_REF = re.compile(r"(:(?:mod|class|func|data|attr|meth|exc|obj):`~?)(\.+)([\w.]*)(`)")
_FROM = re.compile(r"from\s+([.\w]+)\s+import")


def rewrite_python(plan: Plan, path: str, new_path: str, text: str) -> str:
    old_package, new_package = package_of(path), package_of(new_path)
    moved = path != new_path

    def resolve(level: int, module: str | None) -> list[str]:
        base = old_package[: len(old_package) - (level - 1)] if level > 1 else list(old_package)
        return base + (module.split(".") if module else [])

    def render(target: list[str], level: int) -> str:
        return render_relative(target, new_package) if level else ".".join(target)

    # Docstring references first: they do not move the ast's offsets (computed below on this text).
    def doc_ref(m: re.Match[str]) -> str:
        old = resolve(len(m.group(2)), m.group(3) or None)
        new = plan.new_module(old)
        if new == old and not moved:
            return m.group(0)
        relative = render_relative(new, new_package)
        return f"{m.group(1)}{relative}{m.group(4)}"

    if path.startswith("src/"):
        text = _DOC_REF.sub(doc_ref, text)

    try:
        tree = ast.parse(text)
    except SyntaxError as exc:
        raise RelayoutError(f"{path}: cannot parse ({exc})") from exc
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(lineno: int, col: int) -> int:  # ast columns count UTF-8 bytes
        return starts[lineno - 1] + len(lines[lineno - 1].encode()[:col].decode())

    edits: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.end_lineno is None or node.end_col_offset is None:
            continue
        if node.level == 0 and not (node.module or "").startswith("chatstream"):
            continue
        if node.level and not path.startswith("src/"):
            continue  # benchmarks' and tests' own relative imports name nothing of chatstream
        start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        old_target = resolve(node.level, node.module) if node.level else (node.module or "").split(".")
        submodules = [a for a in node.names if ".".join([*old_target, a.name]) in plan.moved_modules]
        if submodules:  # from <package> import <module>, ...: the modules' new packages may differ
            groups: dict[str, list[str]] = {}
            for alias in node.names:
                full = ".".join([*old_target, alias.name])
                if full in plan.moved_modules:
                    *parent, leaf = plan.moved_modules[full].split(".")
                    asname = alias.asname or (alias.name if leaf != alias.name else None)
                else:
                    parent, leaf, asname = plan.new_module(old_target), alias.name, alias.asname
                groups.setdefault(render(parent, node.level), []).append(leaf + (f" as {asname}" if asname else ""))
            indent = " " * node.col_offset
            statement = f"\n{indent}".join(f"from {module} import {', '.join(names)}" for module, names in groups.items())
            edits.append((start, end, statement))
        elif node.level:
            new_target = plan.new_module(old_target)
            if new_target == old_target and not moved:
                continue
            segment = text[start:end]
            m = _FROM.match(segment)
            if m is None:
                raise RelayoutError(f"{path}:{node.lineno}: unexpected import form: {segment!r}")
            edits.append((start + m.start(1), start + m.end(1), render(new_target, node.level)))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


_INCLUDE = re.compile(r'(#include\s+")([^"]+)(")')


def rewrite_includes(plan: Plan, path: str, new_path: str, text: str) -> str:
    def include(m: re.Match[str]) -> str:
        target = os.path.normpath(os.path.join(os.path.dirname(path), m.group(2)))
        new_target = plan.paths.get(target, target)
        return f"{m.group(1)}{os.path.relpath(new_target, os.path.dirname(new_path))}{m.group(3)}"

    return _INCLUDE.sub(include, text)


def native_sources(plan: Plan) -> list[str]:
    """package-data globs (relative to src/chatstream/) covering the C sources and headers at their new places."""
    globs = {f"engine/{PurePosixPath(new).parent}/*{PurePosixPath(new).suffix}".replace("/./", "/")
             for new in plan.moves.values() if new.endswith((".c", ".h"))}
    return sorted(globs)


def rewrite_package_data(plan: Plan, text: str) -> str:
    line = re.search(r"^chatstream = \[(.*)\]$", text, flags=re.MULTILINE)
    if line is None:
        raise RelayoutError("pyproject.toml: no `chatstream = [...]` package-data line to rewrite")
    entries = [e.strip().strip('"') for e in line.group(1).split(",") if e.strip()]
    kept = [e for e in entries if not e.startswith("engine/")]
    new_entries = ", ".join(f'"{e}"' for e in [*kept, *native_sources(plan)])
    return text[: line.start()] + f"chatstream = [{new_entries}]" + text[line.end():]


def layout_rows(plan: Plan) -> str:
    contents: dict[str, list[str]] = {package: [] for package in LAYOUT_ROWS}
    for new in plan.moves.values():
        parent, name = str(PurePosixPath(new).parent), PurePosixPath(new).name
        if name == "__init__.py":
            continue
        contents["" if parent == "." else parent].append(name.removesuffix(".py"))
    rows = []
    for package, what in LAYOUT_ROWS.items():
        where = f"src/chatstream/engine/{package + '/' if package else ''}"
        rows.append(f"| `{where}` | {what} ({', '.join(f'`{n}`' for n in contents[package])}) |")
    return "\n".join(rows)


def rewrite_layout_table(plan: Plan, text: str) -> str:
    row = re.compile(r"^\| `src/chatstream/engine/` \|.*$", flags=re.MULTILINE)
    if not row.search(text):
        raise RelayoutError("README.md: no layout table row for `src/chatstream/engine/`")
    return row.sub(lambda _: layout_rows(plan), text, count=1)


def apply(plan: Plan) -> None:
    root = plan.root
    for old, new in plan.paths.items():
        (root / new).parent.mkdir(parents=True, exist_ok=True)
        git(root, "mv", old, new)
    for package, doc in PACKAGES.items():
        init = f"{ENGINE}/{package}/__init__.py"
        if init not in plan.contents and not (root / init).exists():
            plan.contents[init] = f'"""{doc}"""\n'
    for path, text in plan.contents.items():
        (root / path).write_text(text, encoding="utf-8")
    python = [path for path in plan.contents if path.endswith(".py")]
    sort = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "--fix", "--select", "I", *python],
                          cwd=root, capture_output=True, text=True)
    if sort.returncode != 0:
        plan.warnings.append(f"ruff could not sort every import:\n{sort.stdout}{sort.stderr}")
    git(root, "add", "--", *plan.contents)
    present = [path for path in SELF if (root / path).exists()]
    if present:
        git(root, "rm", "-q", "--", *present)


def main() -> int:
    root = Path(git(Path.cwd(), "rev-parse", "--show-toplevel").strip())
    try:
        plan = make_plan(root)
        apply(plan)
    except RelayoutError as exc:
        print(f"relayout_engine: {exc}", file=sys.stderr)
        return 1
    print(f"moved {len(plan.paths)} files, rewrote {len(plan.contents) - len(plan.paths)} others; staged:")
    print(git(root, "status", "--short"), end="")
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
