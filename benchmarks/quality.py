"""Quality gate against llama.cpp's own: chatstream's teacher-forced NLL of a fixed text next to
``llama-perplexity``'s on the same GGUF file, and greedy replies next to ``llama-server``'s.

    .venv/bin/python -m benchmarks.quality [--model FILE.gguf ...] [--tools /work/peers/bin] \\
        [--prompts 8] [--max-tokens 32] [--save-figures] [--results benchmarks/RESULTS.md]

The text is ``tests/fixtures/quality/`` (the first part of chapter 1 of *Pride and Prejudice*,
public domain), scored as ``llama-perplexity -c 128`` scores it: the tokens in windows of 128
(BOS first where the file's tokenizer adds one), each window's second half predicted from what
precedes it in the window. chatstream computes the same through its engine's model runner (the
serving path: fused forward, native attention, paged KV cache), one token a step, so both NLLs
are means over the same tokens. ``--save-figures`` stores llama.cpp's figures in the fixture
that ``tests/test_quality_gate.py`` asserts against (CI has no llama.cpp).

Greedy replies: the same prompt token ids (the file's chat template, applied by chatstream's
tokenizer) to llama-server's ``/completion`` (temperature 0, token ids back) and to chatstream's
runner (argmax); the count of tokens that match before the first difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "quality"
TEXT = FIXTURES / "pride-and-prejudice-ch1.txt"
FIGURES = FIXTURES / "llamacpp_nll.json"
N_CTX = 128
PROMPTS = [
    "Name three primary colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a prime number is.",
    "Give me two tips for sleeping better.",
    "What does a compiler do?",
    "Translate 'good morning' into Spanish.",
    "List the planets of the solar system.",
]


def windows(tokens: Sequence[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """``llama-perplexity``'s chunks: whole windows of ``n_ctx`` tokens, the first one BOS if the
    vocabulary adds BOS (llama.cpp overwrites the window's first token with it)."""
    out = []
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = list(tokens[start:start + n_ctx])
        if bos is not None:
            window[0] = bos
        out.append(window)
    return out


def run_rows(model: Any, prompts: list[list[int]], next_token: Callable[[int, int, Any], int | None]) -> None:
    """Drive chatstream's model runner over ``prompts`` in one batch, one token a step after each
    prompt: ``next_token(i, j, logits_row)`` gets prompt ``i``'s ``j``-th next-token logits and
    returns the token to append, or None to finish that sequence."""
    import torch

    from chatstream.engine.core.block_manager import BlockManager
    from chatstream.engine.core.scheduler import Scheduler
    from chatstream.engine.core.sequence import Sequence as Seq
    from chatstream.engine.model.runner import ModelRunner
    from chatstream.engine.sampling_params import SamplingParams

    longest = max(len(p) for p in prompts) + 256
    blocks = BlockManager(len(prompts) * (longest // 16 + 2), 16, enable_prefix_caching=False)
    runner = ModelRunner(model, blocks, fused=True)
    scheduler = Scheduler(blocks, max_num_seqs=len(prompts), max_num_batched_tokens=256)
    seqs = [Seq(str(i), list(p), SamplingParams(), 0, None, None, None) for i, p in enumerate(prompts)]  # type: ignore[arg-type]
    for seq in seqs:
        scheduler.add(seq)
    counts = [0] * len(seqs)
    try:
        with torch.inference_mode():
            while scheduler.has_work:
                sampled, logits = runner.execute(scheduler.schedule().chunks)
                for chunk, row in zip(sampled, logits, strict=True):
                    i = seqs.index(chunk.seq)
                    token = next_token(i, counts[i], row)
                    counts[i] += 1
                    if token is None:
                        scheduler.finish(chunk.seq)
                    else:
                        chunk.seq.token_ids.append(token)
    finally:
        runner.close()


def chatstream_nll(model: Any, tokens: Sequence[int], bos: int | None, n_ctx: int = N_CTX) -> tuple[float, int]:
    """Mean NLL (nats) and count of the tokens ``llama-perplexity -c n_ctx`` scores, from
    chatstream's runner: each window's first half + 1 as the prompt, then teacher-forced."""
    import torch

    first = n_ctx // 2
    chunks = windows(tokens, n_ctx, bos)
    targets = [w[first + 1:] for w in chunks]
    total = [0.0]

    def next_token(i: int, j: int, row: Any) -> int | None:
        total[0] -= torch.log_softmax(row.float(), dim=-1)[targets[i][j]].item()
        return targets[i][j] if j + 1 < len(targets[i]) else None

    run_rows(model, [w[:first + 1] for w in chunks], next_token)
    count = sum(len(t) for t in targets)
    return total[0] / count, count


def chatstream_greedy(
    model: Any, prompts: list[list[int]], max_tokens: int, eos: set[int]
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy replies from chatstream's runner, and at each step the gap between the two best logits
    (a difference from another engine where the gap is a rounding error's size is a near-tie)."""
    replies: list[list[int]] = [[] for _ in prompts]
    gaps: list[list[float]] = [[] for _ in prompts]

    def next_token(i: int, j: int, row: Any) -> int | None:
        top = row.float().topk(2)
        token = int(top.indices[0].item())
        replies[i].append(token)
        gaps[i].append(float(top.values[0] - top.values[1]))
        return None if token in eos or len(replies[i]) >= max_tokens else token

    run_rows(model, prompts, next_token)
    return replies, gaps


def gguf_tokenizer_facts(path: Path) -> dict[str, Any]:
    """What llama.cpp's tokenizer does at the start of a text: BOS id and whether it is added."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    return {"add_bos": bool(value("tokenizer.ggml.add_bos_token")), "bos": value("tokenizer.ggml.bos_token_id")}


def text_tokens(tokenizer: Any, path: Path) -> tuple[list[int], int | None]:
    """The fixed text as llama.cpp tokenizes it (``common_tokenize(text, add_special=true)``)."""
    facts = gguf_tokenizer_facts(path)
    bos = int(facts["bos"]) if facts["add_bos"] else None
    tokens = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    return ([bos] if bos is not None else []) + list(tokens), bos


def load(path: Path, weights: str) -> tuple[Any, Any]:
    """The model as ``chatstream serve --model path --gguf-weights weights`` runs it; ``float``
    gets the engine's int8 linears, as its ``--quantization auto`` gives them on CPU."""
    from chatstream.engine.quant.int8 import quantize_linears_int8, resolve_quantization
    from chatstream.model_loader import GGUF_WEIGHTS, load_model

    model, tokenizer = load_model(path, quantized=GGUF_WEIGHTS[weights])
    if resolve_quantization("auto", model) == "int8":
        quantize_linears_int8(model)
    return model, tokenizer


def llamacpp_nll(tools: Path, path: Path, n_ctx: int = N_CTX) -> dict[str, Any]:
    """``llama-perplexity``'s mean NLL of the fixed text: the last row of ``--ppl-output-type 1``."""
    command = [str(tools / "llama-perplexity"), "-m", str(path), "-f", str(TEXT), "-c", str(n_ctx), "-b", str(n_ctx),
               "-t", str(len(os.sched_getaffinity(0))), "--ppl-output-type", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    rows = re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$", out.stdout + out.stderr, re.M)
    if not rows:
        raise RuntimeError(f"no perplexity rows in llama-perplexity's output:\n{out.stderr[-2000:]}")
    ppl, nll, stderr = (float(x) for x in rows[-1])
    display = " ".join(["llama-perplexity", *command[1:]]).replace(str(REPO_ROOT) + "/", "")
    return {"nll": nll, "ppl": ppl, "nll_stderr": stderr, "tokens": len(rows) * (n_ctx - n_ctx // 2 - 1),
            "command": re.sub(r"-m \S+", f"-m {path.name}", display)}


def llama_server_greedy(tools: Path, path: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """llama-server's greedy replies to the same prompt ids (``/completion``, temperature 0)."""
    import httpx

    from benchmarks.compare import free_port

    port = free_port()
    log = open(f"/tmp/quality-llama-server-{port}.log", "wb")  # closed in the finally below
    server = subprocess.Popen(
        [str(tools / "llama-server"), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-np", "1",
         "-c", "2048", "-t", str(len(os.sched_getaffinity(0)))],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"llama-server did not start: see {log.name}")
            time.sleep(0.5)
        replies = []
        for prompt in prompts:
            body = {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
                    "return_tokens": True, "seed": 0}
            answer = httpx.post(f"{url}/completion", json=body, timeout=300).json()
            replies.append(list(answer["tokens"]))
        return replies
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if isinstance(ids, list) else [ids]
    return {int(i) for i in [*ids, tokenizer.eos_token_id] if i is not None}


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    from chatstream.model_loader import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append",
                        help="GGUF file (repeatable; default: the embedded model's)")
    parser.add_argument("--weights", choices=["stored", "float"], action="append",
                        help="chatstream's --gguf-weights to measure (repeatable; default: both)")
    parser.add_argument("--tools", type=Path, default=Path("/work/peers/bin"),
                        help="folder with llama-perplexity and llama-server")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--save-figures", action="store_true", help="store llama.cpp's NLLs in the test fixture")
    parser.add_argument("--results", type=Path, default=None, help="write a 'quality' section into this RESULTS.md")
    opts = parser.parse_args(argv)
    models = opts.model or [default_model_path()]
    variants = opts.weights or ["stored", "float"]
    figures = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    rows, greedy_rows = [], []
    for path in models:
        reference = llamacpp_nll(opts.tools, path)
        print(f"{path.name}: llama.cpp NLL {reference['nll']:.4f} over {reference['tokens']} tokens", flush=True)
        figures[path.name] = {**reference, "text": TEXT.name, "n_ctx": N_CTX}
        server_replies: list[list[int]] | None = None
        for weights in variants:
            model, tokenizer = load(path, weights)
            tokens, bos = text_tokens(tokenizer, path)
            nll, count = chatstream_nll(model, tokens, bos)
            print(f"  chatstream --gguf-weights {weights}: NLL {nll:.4f} over {count} tokens "
                  f"({nll - reference['nll']:+.4f})", flush=True)
            rows.append((path.name, weights, nll, reference["nll"], count, reference["tokens"]))
            prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                          tokenize=True, return_dict=True)["input_ids"])
                       for p in PROMPTS[:opts.prompts]]
            if server_replies is None:
                server_replies = llama_server_greedy(opts.tools, path, prompts, opts.max_tokens)
            ours, gaps = chatstream_greedy(model, prompts, opts.max_tokens, eos_ids(model, tokenizer))
            matched = [matching_prefix(a, b) for a, b in zip(ours, server_replies, strict=True)]
            # the top-2 logit gap where each reply first differs from llama-server's (no gap: identical)
            split = [round(g[k], 3) for g, k, a, b in zip(gaps, matched, ours, server_replies, strict=True)
                     if a != b and k < len(g)]
            same = sum(a == b for a, b in zip(ours, server_replies, strict=True))
            total = sum(max(len(a), len(b)) for a, b in zip(ours, server_replies, strict=True))
            print(f"  greedy: {sum(matched)} of {total} tokens match before the first difference; {same} of "
                  f"{len(prompts)} replies identical; per prompt {matched}; top-2 logit gap where they split {split}",
                  flush=True)
            greedy_rows.append((path.name, weights, sum(matched), total, same, len(prompts), matched, split))
            del model
    if opts.save_figures:
        FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")
        print(f"llama.cpp's figures saved in {FIGURES.relative_to(REPO_ROOT)}")
    if opts.results:
        write_results(opts.results, rows, greedy_rows, argv if argv is not None else sys.argv[1:], opts)
    return 0


def write_results(path: Path, rows: list[Any], greedy_rows: list[Any], argv: list[str], opts: Any) -> None:
    from benchmarks.compare import machine_info, write_section

    info = machine_info()
    lines = [
        "<!-- suite:quality:start -->",
        "## quality: chatstream's NLL and greedy replies vs llama.cpp's on the same GGUF file",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {info['cpu']}, {info['cores']} cores; "
        f"commit {info['commit']}",
        f"- Command: `.venv/bin/python -m benchmarks.quality {' '.join(argv)}`",
        f"- Text: `tests/fixtures/quality/{TEXT.name}`, windows of {N_CTX} tokens, the second half of each scored "
        f"(`llama-perplexity -c {N_CTX} -b {N_CTX} --ppl-output-type 1`); chatstream through its engine's runner",
        "",
        "| file | chatstream --gguf-weights | chatstream NLL | llama.cpp NLL | difference | tokens |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, weights, nll, ref, count, ref_count in rows:
        lines.append(f"| {name} | {weights} | {nll:.4f} | {ref:.4f} | {nll - ref:+.4f} | {count} / {ref_count} |")
    lines += [
        "",
        f"Greedy replies, {opts.prompts} chat prompts x {opts.max_tokens} tokens at most, the same prompt ids to both "
        "(llama-server `/completion`, temperature 0): tokens that match before the first difference.",
        "",
        "The last column is chatstream's gap between its two best logits at the token where a reply first "
        "differs: a gap of a few hundredths is a near-tie that rounding decides either way.",
        "",
        "| file | chatstream --gguf-weights | matching tokens | identical replies | per prompt | top-2 gap at the split |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, weights, matched, total, same, n, per, split in greedy_rows:
        lines.append(f"| {name} | {weights} | {matched} of {total} | {same} of {n} | {per} | {split} |")
    lines.append("<!-- suite:quality:end -->\n")
    write_section(path, "quality", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
