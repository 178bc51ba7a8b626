"""The embedded default model runs from its own GGUF file (Q4_1 layers, Q8_0 embeddings) with its
weights kept as stored: its numbers against the float forward of the same dequantized weights."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
from test_llama_forward import teacher_forced
from test_quantization import chat

from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.quant.gguf_model import QuantEmbedding, QuantLinear, resident_bytes
from chatstream.engine.sampling_params import SamplingParams
from chatstream.model_loader import default_model_path, load_model

TEXT = (
    "The sun is the star at the centre of the Solar System. It is a massive, nearly perfect sphere of hot "
    "plasma, heated to incandescence by nuclear fusion reactions in its core, radiating the energy from its "
    "surface mainly as visible light and infrared radiation. It is by far the most important source of "
    "energy for life on Earth."
)


def dequantized(model: Any) -> Any:
    """The same model with every quantized layer replaced by a float32 one of the same values."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, QuantLinear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.weight_blocks.values()
            if module.bias is not None:
                linear.bias.data = module.bias.clone()
            setattr(parent, child, linear)
        elif isinstance(module, QuantEmbedding):
            setattr(parent, child, torch.nn.Embedding.from_pretrained(module.weight_blocks.values()))
    return model


@pytest.fixture(scope="module")
def default_model() -> tuple[Any, Any]:
    """The embedded model as ``chatstream serve`` loads it: from its GGUF, weights as stored."""
    return load_model(quantized=True)


def nll_and_top1(model: Any, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        out = model(input_ids=ids, labels=ids)
    return float(out.loss), out.logits[0].argmax(dim=-1)


def test_the_default_model_keeps_its_gguf_weights_as_stored(default_model: tuple[Any, Any]) -> None:
    model, _ = default_model
    inner = model.model
    assert isinstance(inner.embed_tokens, QuantEmbedding)
    assert isinstance(model.get_output_embeddings(), QuantLinear)  # tied: the embeddings' Q8_0 blocks
    layer = inner.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
        assert isinstance(linear, QuantLinear) and linear.weight_blocks.source == "Q4_1"
    assert model.get_output_embeddings().weight_blocks is inner.embed_tokens.weight_blocks
    # No float matrix anywhere: the weights take about the file's bytes (98 MB), not float32's 540 MB.
    assert all(p.dim() == 1 for p in model.parameters())
    assert resident_bytes(model) <= 1.05 * default_model_path().stat().st_size


def test_logits_and_nll_match_the_float_forward_of_the_same_weights(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    ids = torch.tensor([tokenizer.encode(TEXT)])
    nll, top1 = nll_and_top1(model, ids)
    float_nll, float_top1 = nll_and_top1(dequantized(model), ids)
    # Only the activations' int8 blocks differ from the float forward (as in llama.cpp).
    assert abs(nll - float_nll) < 0.02, (nll, float_nll)
    assert (top1 == float_top1).float().mean().item() >= 0.95


def test_the_engines_fused_native_forward_keeps_the_float_nll(default_model: tuple[Any, Any]) -> None:
    """Through the engine's runner (fused forward, native attention and block kernels), batched with
    another sequence, teacher-forced on the fixed text: the NLL of the float forward, within 0.05 nats (measured: 2.414 vs 2.438)."""
    model, tokenizer = default_model
    ids = tokenizer.encode(TEXT)
    other = tokenizer.encode("A second sequence shares every step with the first one.")
    rows = teacher_forced(model, [ids[:8], other[:4]], [ids[8:], other[4:]], fused=True, step_tokens=32)[0]
    nll = torch.nn.functional.cross_entropy(rows[1:], torch.tensor(ids[9:])).item()  # row j predicts ids[8 + j]
    with torch.inference_mode():
        logits = dequantized(model)(input_ids=torch.tensor([ids])).logits[0]
    float_nll = torch.nn.functional.cross_entropy(logits[8:-1], torch.tensor(ids[9:])).item()
    assert abs(nll - float_nll) < 0.05, (nll, float_nll)


async def test_the_engine_serves_the_gguf_model_with_native_kernels(default_model: tuple[Any, Any]) -> None:
    model, tokenizer = default_model
    engine = LLMEngine(model, tokenizer, max_num_seqs=4, kv_cache_memory_bytes=32 << 20)
    assert engine._runner.fused is not None and engine._runner.fused.ops.name == "native"
    prompt = chat(tokenizer, "Name three primary colors.")
    await engine.start()
    try:
        outputs = [output async for output in engine.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=8))]
    finally:
        await engine.shutdown()
    assert outputs[-1].finished and "primary colors" in "".join(o.text for o in outputs)


async def test_gguf_blocks_run_on_every_usable_core_by_default(default_model: tuple[Any, Any]) -> None:
    """The block kernels and decode attention share the native thread pool, which no event loop
    stalls: every usable core by default; PyTorch's ops (``--kernels torch``) keep one for the loop."""
    model, tokenizer = default_model
    cores = len(os.sched_getaffinity(0))
    for kernels, threads, expected in (("auto", None, cores), ("torch", None, max(1, cores - 1)), ("auto", 1, 1)):
        engine = LLMEngine(model, tokenizer, max_num_seqs=2, kv_cache_memory_bytes=16 << 20, kernels=kernels,
                           num_threads=threads)
        try:
            assert engine.backend.threads == expected, (kernels, threads)
        finally:
            await engine.shutdown()


def test_gguf_weights_auto_keeps_the_blocks_of_every_quantized_file() -> None:
    """``--gguf-weights auto`` runs a quantized GGUF from its blocks, the default model's included
    (no float32 conversion at first start); ``float`` still converts."""
    from chatstream.model_loader import GGUF_WEIGHTS, _quantized_gguf

    assert _quantized_gguf(None, GGUF_WEIGHTS["auto"]) == default_model_path()
    assert _quantized_gguf(None, GGUF_WEIGHTS["stored"]) == default_model_path()
    assert _quantized_gguf(None, GGUF_WEIGHTS["float"]) is None
