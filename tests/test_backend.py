"""Every backend this machine can run, against transformers: one backend chosen once, from facts.

Each (forward, ops, linear format) the engine can take here runs the same prompts through the
engine's own runner: the float ones must give transformers' logits and its greedy replies, the
int8 ones must pass the int8 quality gate against them. Then: two engines started on the same
model choose the same backend and give the same greedy tokens (no timing takes part).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from test_llama_forward import teacher_forced
from test_quantization import PROMPTS, chat

from chatstream.engine import SamplingParams
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.model.backend import select_backend
from chatstream.engine.ops import native
from chatstream.engine.quant.int8 import quantize_linears_int8
from chatstream.model_loader import load_model


@pytest.fixture(scope="module")
def own_model() -> tuple[Any, Any]:
    return load_model(quantized=False)  # float32, its own copy: int8 swaps layers in place


@pytest.fixture(scope="module")
def greedy(own_model: tuple[Any, Any]) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor]]:
    """Three prompts, transformers' greedy replies (12 tokens) and its logits along them (one plain forward each)."""
    model, tokenizer = own_model
    prompts = [chat(tokenizer, p) for p in PROMPTS[:3]]
    with torch.inference_mode():
        replies = [model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)[0, len(p):].tolist()
                   for p in prompts]
        logits = [model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1 : len(p) + len(r) - 1]
                  for p, r in zip(prompts, replies)]
    return prompts, replies, logits


def _native_int8() -> bool:
    kernels = native.load("auto")
    return kernels is not None and kernels.int8


# (fused forward, kernels flag, int8 linears) -> the backend's (forward, ops, linear) on this machine.
MATRIX = [
    (False, "torch", False), (True, "torch", False), (True, "native", False),
    (False, "torch", True), (True, "torch", True), (True, "native", True),
]


@pytest.mark.parametrize(("fused", "kernels", "int8"), MATRIX,
                         ids=["hf-float", "fused-torch-float", "fused-native-float", "hf-int8", "fused-torch-int8",
                              "fused-native-int8"])
def test_every_backend_gives_transformers_logits_or_passes_the_int8_gate(
    own_model: tuple[Any, Any], greedy: tuple[list[list[int]], list[list[int]], list[torch.Tensor]],
    fused: bool, kernels: str, int8: bool,
) -> None:
    model, _ = own_model
    prompts, replies, reference = greedy
    restore = quantize_linears_int8(model) if int8 else None
    try:
        backend, _ = select_backend(model, fused=fused, kernels=kernels)
        assert (backend.forward, backend.ops) == ("fused" if fused else "hf", kernels)
        expected_linear = "float" if not int8 else "int8-vnni" if kernels == "native" and _native_int8() else "int8-intmm"
        assert backend.linear == expected_linear
        assert backend.kv_layout == ("keys-transposed" if kernels == "native" else "heads-blocks")
        assert (backend.decode_attention == "native") == (kernels == "native")
        logits = teacher_forced(model, prompts, replies, fused=fused, step_tokens=64, kernels=kernels)
    finally:
        if restore is not None:
            restore()
    if not int8:
        for ref, got, reply in zip(reference, logits, replies):
            torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)
            assert got.argmax(-1).tolist() == reply  # transformers' own greedy reply
        return
    agreed = [sum(a == b for a, b in zip(rows.argmax(-1).tolist(), reply)) / len(reply)
              for rows, reply in zip(logits, replies)]
    assert min(agreed) >= 0.75 and sum(agreed) / len(agreed) >= 0.85, agreed  # test_quantization's gate


async def _greedy_tokens(engine: LLMEngine, prompts: list[list[int]]) -> list[str]:
    async def one(prompt: list[int]) -> str:
        text = ""
        async for output in engine.generate(prompt, SamplingParams(max_new_tokens=16)):
            text += output.text
        return text

    try:
        return list(await asyncio.gather(*(one(p) for p in prompts)))
    finally:
        await engine.shutdown()


def test_starting_twice_chooses_the_same_backend_and_the_same_greedy_tokens(own_model: tuple[Any, Any]) -> None:
    model, tokenizer = own_model
    prompts = [chat(tokenizer, p) for p in PROMPTS[:3]]
    runs = []
    for _ in range(2):
        engine = LLMEngine(model, tokenizer, max_num_seqs=4, kv_cache_memory_bytes=64 << 20)
        backend = engine.backend
        assert engine.info.backend == backend.as_dict()
        runs.append((backend, asyncio.run(_greedy_tokens(engine, prompts))))
    assert runs[0] == runs[1]
    assert runs[0][0].linear.startswith("int8")  # auto on a float32 CPU model: int8, by rule, not by timing


# A 16-bit KV cache under the float32 model: rounded as written (float16 keeps 11 significant bits,
# bfloat16 8). Measured on the default model along transformers' greedy replies: float16 moves a
# logit by at most ~0.03, bfloat16 by ~0.2; neither changed an argmax there.
KV_MATRIX = [("torch", "float16", 0.1), ("native", "float16", 0.1), ("torch", "bfloat16", 0.5),
             ("native", "bfloat16", 0.5)]


@pytest.mark.parametrize(("kernels", "kv_dtype", "atol"), KV_MATRIX,
                         ids=[f"fused-{k}-float-kv-{d}" for k, d, _ in KV_MATRIX])
def test_a_16_bit_kv_cache_stays_close_to_transformers_logits(
    own_model: tuple[Any, Any], greedy: tuple[list[list[int]], list[list[int]], list[torch.Tensor]],
    kernels: str, kv_dtype: str, atol: float,
) -> None:
    model, _ = own_model
    prompts, replies, reference = greedy
    backend, _ = select_backend(model, kernels=kernels, kv_cache_dtype=kv_dtype)
    assert (backend.ops, backend.kv_dtype) == (kernels, kv_dtype)
    logits = teacher_forced(model, prompts, replies, fused=True, step_tokens=64, kernels=kernels,
                            kv_cache_dtype=kv_dtype)
    for ref, got, reply in zip(reference, logits, replies):
        torch.testing.assert_close(got, ref, atol=atol, rtol=0)
        assert got.argmax(-1).tolist() == reply


def test_auto_kv_dtype_is_the_models_by_rule(own_model: tuple[Any, Any]) -> None:
    model, _ = own_model
    # A 16-bit cache did not measure faster here (backend._kv_dtype): auto keeps the model's float32.
    assert select_backend(model, kernels="auto")[0].kv_dtype == "float32"
    assert select_backend(model, kernels="torch")[0].kv_dtype == "float32"
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        select_backend(model, kv_cache_dtype="int8")


def test_a_16_bit_kv_cache_holds_twice_the_tokens_in_the_same_memory(own_model: tuple[Any, Any]) -> None:
    model, tokenizer = own_model
    infos = {}
    for dtype in ("float32", "float16", "bfloat16"):
        engine = LLMEngine(model, tokenizer, max_num_seqs=2, kv_cache_memory_bytes=20 * 16 * 46080, kv_cache_dtype=dtype)
        infos[dtype] = engine.info
        assert engine.backend.kv_dtype == dtype and engine._runner.cache.layers[0].dtype == getattr(torch, dtype)
        asyncio.run(engine.shutdown())
    layers, kv_heads, head_dim = 30, 3, 64  # SmolLM2-135M
    assert infos["float32"].kv_bytes_per_token == 2 * layers * kv_heads * head_dim * 4
    for dtype in ("float16", "bfloat16"):
        assert infos[dtype].kv_bytes_per_token * 2 == infos["float32"].kv_bytes_per_token
        assert (infos["float32"].num_blocks, infos[dtype].num_blocks) == (20, 40)
        assert infos[dtype].backend["kv_dtype"] == dtype  # type: ignore[index]


def test_greedy_replies_with_a_16_bit_kv_cache_match_float32(own_model: tuple[Any, Any]) -> None:
    """Float32 linears (int8's own rounding noise would swamp the cache's: with int8 linears only
    34 of 157 tokens matched before the first difference), 8 prompts x 24 greedy tokens: how far
    each 16-bit reply follows the float32 one, token for token, before it first differs."""
    model, tokenizer = own_model
    prompts = [chat(tokenizer, p) for p in PROMPTS]

    def replies(dtype: str) -> list[list[int]]:
        engine = LLMEngine(model, tokenizer, max_num_seqs=8, kv_cache_memory_bytes=64 << 20, kv_cache_dtype=dtype,
                           quantization=None)

        async def run() -> list[list[int]]:
            async def one(prompt: list[int]) -> list[int]:
                text = ""
                async for output in engine.generate(prompt, SamplingParams(max_new_tokens=24)):
                    text += output.text
                ids: list[int] = tokenizer.encode(text, add_special_tokens=False)  # the reply's tokens
                return ids
            try:
                return list(await asyncio.gather(*(one(p) for p in prompts)))
            finally:
                await engine.shutdown()

        return asyncio.run(run())

    reference = replies("float32")
    for dtype in ("float16", "bfloat16"):
        got = replies(dtype)
        common = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
                  for r, g in zip(reference, got)]
        total = sum(len(r) for r in reference)
        print(f"{dtype}: {sum(common)}/{total} greedy tokens as float32's before the first difference, per prompt {common}")
        # Measured: float16 159/159 tokens, bfloat16 153/159 (one reply parts at its 18th token).
        assert sum(common) >= (0.95 if dtype == "float16" else 0.85) * total, (dtype, common)
