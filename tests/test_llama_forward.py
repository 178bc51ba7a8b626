"""The engine's fused Llama forward computes what transformers computes, on the real default model.

Both paths run through the engine's own ModelRunner (paged cache, ragged batches, chunked
prefill mixed with decodes), fed the same tokens: float32 must give the same logits, and the
int8 path must pass the same quality gate against float32 as the int8 layers do alone.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_quantization import PROMPTS, chat, greedy_replies
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.scheduler import Scheduler
from chatstream.engine.core.sequence import Sequence
from chatstream.engine.model import llama
from chatstream.engine.model.runner import ModelRunner
from chatstream.engine.quant.int8 import Int8Linear, OnednnInt8Weight, int8_linear, quantize_linears_int8
from chatstream.engine.sampling_params import SamplingParams
from chatstream.model_loader import load_model


@pytest.fixture(scope="module")
def own_model() -> tuple[Any, Any]:
    return load_model(quantized=False)  # float32, its own copy: int8 swaps layers in place


@pytest.fixture(scope="module")
def greedy(own_model: tuple[Any, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and transformers' own float32 greedy replies to them (its generate, its cache)."""
    model, tokenizer = own_model
    prompts = [chat(tokenizer, p) for p in PROMPTS]
    return prompts, greedy_replies(model, prompts)


def teacher_forced(
    model: Any, prompts: list[list[int]], replies: list[list[int]], *, fused: bool, step_tokens: int,
    kernels: str = "auto", kv_cache_dtype: str = "float32",
) -> list[torch.Tensor]:
    """Each prompt's next-token logits along its given reply, [len(reply), V] per prompt, from the
    engine's runner with every prompt in one batch and at most ``step_tokens`` tokens a step."""
    blocks = BlockManager(512, 16, enable_prefix_caching=False)
    runner = ModelRunner(model, blocks, fused=fused, kernels=kernels, kv_cache_dtype=kv_cache_dtype)
    assert (runner.fused is not None) == fused
    scheduler = Scheduler(blocks, max_num_seqs=len(prompts), max_num_batched_tokens=step_tokens)
    seqs = [Sequence(str(i), list(p), SamplingParams(), 0, None, None, None) for i, p in enumerate(prompts)]  # type: ignore[arg-type]
    for seq in seqs:
        scheduler.add(seq)
    rows: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(seqs))}
    try:
        with torch.inference_mode():
            while scheduler.has_work:
                sampled, logits = runner.execute(scheduler.schedule().chunks)
                for chunk, row in zip(sampled, logits):
                    i = seqs.index(chunk.seq)
                    rows[i].append(row.clone())
                    if len(rows[i]) < len(replies[i]):
                        chunk.seq.token_ids.append(replies[i][len(rows[i]) - 1])
                    else:
                        scheduler.finish(chunk.seq)
    finally:
        runner.close()
    return [torch.stack(rows[i]) for i in range(len(seqs))]


def test_the_fused_forward_gives_transformers_logits_in_float32(
    own_model: tuple[Any, Any], greedy: tuple[list[list[int]], list[list[int]]]
) -> None:
    model, _ = own_model
    prompts, replies = greedy[0][:4], greedy[1][:4]
    # 48 tokens a step: prompts are prefilled in chunks, beside other prompts' decodes.
    reference = teacher_forced(model, prompts, replies, fused=False, step_tokens=48)
    fused = teacher_forced(model, prompts, replies, fused=True, step_tokens=48)
    for ref, got, reply in zip(reference, fused, replies):
        assert got.shape == ref.shape == (len(reply), ref.shape[1])
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=1e-4)
        assert got.argmax(-1).tolist() == ref.argmax(-1).tolist() == reply  # transformers' own greedy reply


def test_the_fused_int8_forward_picks_the_float32_greedy_token_at_most_positions(
    own_model: tuple[Any, Any], greedy: tuple[list[list[int]], list[list[int]]]
) -> None:
    """The quality gate of tests/test_quantization.py, on the path the engine serves by default."""
    model, _ = own_model
    prompts, replies = greedy
    restore = quantize_linears_int8(model)
    try:
        logits = teacher_forced(model, prompts, replies, fused=True, step_tokens=2048)
    finally:
        restore()
    agreed = [
        sum(a == b for a, b in zip(rows.argmax(-1).tolist(), reply)) / len(reply)
        for rows, reply in zip(logits, replies)
    ]
    print("fused int8 picks float32's greedy token at these shares of positions:", [round(a, 2) for a in agreed])
    assert min(agreed) >= 0.75, agreed
    assert sum(agreed) / len(agreed) >= 0.85, agreed


TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "vocab_size": 300, "max_position_embeddings": 256}


@pytest.mark.parametrize(
    ("model_class", "config"),
    [
        (Qwen2ForCausalLM, Qwen2Config(**TINY, num_key_value_heads=2)),  # q/k/v biases
        (MistralForCausalLM, MistralConfig(**TINY, num_key_value_heads=2, sliding_window=None)),
        (LlamaForCausalLM, LlamaConfig(  # one KV head, every bias, Llama 3's RoPE scaling
            **TINY, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )),
    ],
    ids=["qwen2", "mistral", "llama3-biases"],
)
def test_the_fused_forward_matches_transformers_on_each_supported_architecture(
    model_class: Any, config: Any
) -> None:
    """Small randomly initialised models of each architecture the fused path claims."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    assert llama.supports(model)
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (20, 37, 5)]
    replies = [torch.randint(0, 300, (10,)).tolist() for _ in prompts]
    reference = teacher_forced(model, prompts, replies, fused=False, step_tokens=16)
    fused = teacher_forced(model, prompts, replies, fused=True, step_tokens=16)
    for ref, got in zip(reference, fused):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_only_llama_family_models_take_the_fused_path(own_model: tuple[Any, Any]) -> None:
    model, _ = own_model
    assert llama.supports(model)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0))
    assert not llama.supports(gpt2)
    blocks = BlockManager(8, 16, enable_prefix_caching=False)
    runner = ModelRunner(gpt2, blocks)
    try:
        assert runner.fused is None  # transformers' forward, with the paged attention plugged in
    finally:
        runner.close()


def test_the_onednn_int8_kernel_gives_the_same_products_bit_for_bit(own_model: tuple[Any, Any]) -> None:
    """The engine may compute the output projection through oneDNN's prepacked int8 kernel
    (the backend's choice where that kernel exists): its results must equal ``_int_mm``'s exactly, so
    the choice never changes a token."""
    model, _ = own_model
    head = Int8Linear(model.get_output_embeddings())  # a quantized copy; the model is untouched
    packed = OnednnInt8Weight(head.weight)
    for rows in (1, 5, 16):
        x = torch.randn(rows, head.in_features) * 4
        plain = int8_linear(x, head.weight, head.weight_scale)
        reference = x @ model.get_output_embeddings().weight.detach().t()
        assert (plain - reference).abs().max() < 0.05 * reference.abs().max()  # it is that product
        x[0, 0] = 300.0  # an outlier, as chat templates' first tokens have
        assert torch.equal(
            int8_linear(x, head.weight, head.weight_scale, packed=packed), int8_linear(x, head.weight, head.weight_scale)
        )
