"""chatstream's C kernels (engine/ops/kernels.c), built here by the machine's compiler, against PyTorch.

Each kernel is compared with the PyTorch operators it replaces, on shapes that reach its edge
cases (partial blocks, partial tiles, grouped heads, strided rows); then the engine's int8 step
with and without them, on the real default model. How it falls back without a compiler is
tested with a compiler that fails.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_llama_forward import teacher_forced
from test_quantization import PROMPTS, chat, greedy_replies
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from chatstream.engine.core.block_manager import BlockManager
from chatstream.engine.core.llm_engine import LLMEngine
from chatstream.engine.model import attention
from chatstream.engine.model.attention import BatchMetadata, PagedKVCache
from chatstream.engine.model.runner import ModelRunner
from chatstream.engine.ops import layer_ops as ops
from chatstream.engine.ops import native
from chatstream.engine.quant.int8 import Int8Linear, int8_linear, quantize_linears_int8, quantize_weight
from chatstream.model_loader import load_model


@pytest.fixture(scope="module")
def kernels() -> native.NativeKernels:
    loaded = native.load("native")
    assert loaded is not None
    return loaded


def decode_case(
    rows: int, heads: int, kv_heads: int, dim: int, block_size: int, lengths: list[int]
) -> tuple[torch.Tensor, BatchMetadata]:
    """A shuffled paged cache and the runner's decode metadata for one query per row."""
    torch.manual_seed(rows * 7 + dim)
    tables, free = [], torch.randperm(sum(-(-n // block_size) for n in lengths) + 3).tolist()
    for n in lengths:
        tables.append([free.pop() for _ in range(-(-n // block_size))])
    cache = torch.randn(len(free) + sum(map(len, tables)), kv_heads, 2, block_size, dim)
    pair_blocks = [b for t in tables for b in t]
    pair_rows = [r for r, t in enumerate(tables) for _ in t]
    pair_lengths = [min(block_size, n - i * block_size) for n, t in zip(lengths, tables) for i in range(len(t))]
    padding = torch.arange(block_size)[None, :] >= torch.tensor(pair_lengths)[:, None]
    bias = torch.zeros(padding.shape).masked_fill_(padding, float("-inf"))
    starts = [0]
    for t in tables:
        starts.append(starts[-1] + len(t))
    meta = BatchMetadata(
        cache=PagedKVCache([cache]), write_index=torch.zeros(0, dtype=torch.long), num_decode=rows,
        pair_blocks=torch.tensor(pair_blocks), pair_rows=torch.tensor(pair_rows),
        pair_bias=bias.repeat_interleave(kv_heads, dim=0)[:, None, :],
        decode_starts=torch.tensor(starts), decode_lengths=torch.tensor(lengths),
    )
    return cache, meta


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "block_size"),
    [(9, 3, 64, 16), (8, 8, 128, 16), (4, 1, 48, 8), (6, 2, 32, 32)],
    ids=["smollm2", "mha-128", "mqa-48", "block-32"],
)
def test_native_decode_attention_equals_pytorchs(
    kernels: native.NativeKernels, heads: int, kv_heads: int, dim: int, block_size: int
) -> None:
    lengths = [1, block_size, block_size + 1, 5 * block_size - 3, 130]
    cache, meta = decode_case(len(lengths), heads, kv_heads, dim, block_size, lengths)
    # Queries as the fused forward leaves them: rows of [q | k] heads, so strided.
    q = torch.randn(len(lengths), heads + kv_heads, dim)[:, :heads]
    scale = dim**-0.5
    reference = attention.decode_bmm(q, cache, meta, scale)
    assert meta.decode_starts is not None and meta.decode_lengths is not None
    native_cache = native.keys_transposed(cache)  # the layout the fused forward writes for the kernel
    torch.testing.assert_close(native.keys_in_order(native_cache[:, :, 0]), cache[:, :, 0], atol=0, rtol=0)
    got = kernels.paged_decode_attention(
        q, native_cache, meta.pair_blocks, meta.decode_starts, meta.decode_lengths, scale
    )
    torch.testing.assert_close(got, reference, atol=2e-6, rtol=1e-5)
    # and as the engine calls it: each backend's decode attention op (native, PyTorch's flash and bmm)
    native_ops = ops.NativeOps(kernels, 1e-5, heads, kv_heads, dim)
    torch.testing.assert_close(native_ops.decode_attention(q, native_cache, meta, scale), reference, atol=2e-6,
                               rtol=1e-5)
    for name in ("flash", "bmm") if attention.cpu_flash_available() else ("bmm",):
        torch_ops = ops.TorchOps(1e-5, heads, kv_heads, dim, name)
        torch.testing.assert_close(torch_ops.decode_attention(q, cache, meta, scale), reference, atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module", params=[(), ("-mno-avx512f",)], ids=["native", "avx2"])
def isa_kernels(request: pytest.FixtureRequest) -> native.NativeKernels:
    """The kernels as this CPU builds them, and the AVX2 build (-mno-avx512f), checked at load like the engine's."""
    if not request.param:
        return native.load("native")  # type: ignore[return-value]
    built = native.NativeKernels(native.build(native.SOURCE, request.param))
    native._check(built)
    return built


def _split_attention(kernels: native.NativeKernels, run: Any) -> None:
    """Call ``run`` until one of the pool's helper threads has done part of it (bounded: on a
    loaded machine the caller may finish every chunk before a helper is scheduled)."""
    helped = kernels.pool_stats()[1]
    for _ in range(200):
        run()
        if kernels.pool_stats()[1] > helped:
            return
    raise AssertionError("no helper thread ran any part of 200 attention calls")


@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "dtype"),
    [(9, 3, 64, torch.float32), (32, 8, 64, torch.float32), (4, 1, 48, torch.float32), (9, 3, 64, torch.bfloat16),
     (9, 3, 64, torch.float16)],
    ids=["smollm2", "llama-1b", "mqa-48", "smollm2-bf16", "smollm2-f16"],
)
def test_native_decode_attention_gives_the_same_bits_on_one_thread_or_several(
    isa_kernels: native.NativeKernels, heads: int, kv_heads: int, dim: int, dtype: torch.dtype
) -> None:
    """16 rows of different lengths, their (row, KV head) pairs split across the thread pool: each
    query head is computed by one thread in the same order, so 1, 2 and 3 threads give equal
    tensors (bitwise), and all agree with PyTorch's attention over the same (rounded) cache."""
    if dtype not in isa_kernels.kv_dtypes:
        pytest.skip(f"this build has no {dtype} KV cache")
    lengths = [1, 16, 17, 300, 77, 130, 2, 250, 45, 160, 31, 99, 200, 8, 64, 129]
    cache, meta = decode_case(len(lengths), heads, kv_heads, dim, 16, lengths)
    cache = cache.to(dtype)
    q = torch.randn(len(lengths), heads + kv_heads, dim)[:, :heads]
    assert meta.decode_starts is not None and meta.decode_lengths is not None
    native_cache, scale = native.keys_transposed(cache), dim**-0.5

    def attend(threads: int) -> torch.Tensor:
        assert meta.decode_starts is not None and meta.decode_lengths is not None
        return isa_kernels.paged_decode_attention(q, native_cache, meta.pair_blocks, meta.decode_starts,
                                                  meta.decode_lengths, scale, threads=threads)

    one = attend(1)
    torch.testing.assert_close(one, attention.decode_bmm(q, cache.float(), meta, scale), atol=2e-6, rtol=1e-5)
    for threads in (2, 3):
        assert torch.equal(attend(threads), one)
    _split_attention(isa_kernels, lambda: attend(2))
    assert torch.equal(attend(2), one)
    assert isa_kernels.pool_stats()[0] >= 1


def test_the_quantized_kernels_run_on_the_same_thread_pool(kernels: native.NativeKernels) -> None:
    """One pool for the process: the GGUF block kernels (both builds) hand their chunks to
    kernels.c's helper threads, and never start threads of their own."""
    from chatstream.engine.quant import native as quant_native
    from chatstream.engine.quant.formats import TiledWeight, requantize_q8

    generator = torch.Generator().manual_seed(5)
    weight = TiledWeight.from_blocks(requantize_q8(torch.randn(1024, 512, generator=generator).numpy(), "pool"))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flags in ((), ("-mno-avx512f",)):
            quant = quant_native.load(flags)
            assert quant is not None
            rows = quant.quantize(torch.randn(16, 512, generator=generator))
            expected = quant.linear(rows, weight)
            helped = kernels.pool_stats()[1]
            for _ in range(200):
                assert torch.equal(quant.linear(rows, weight), expected)
                if kernels.pool_stats()[1] > helped:
                    break
            assert kernels.pool_stats()[1] > helped, "kernels.c's pool ran no chunk of 200 quantized products"
            assert quant.own_pool_threads() == 0
    finally:
        torch.set_num_threads(previous)


def test_native_rope_and_kv_write_equal_pytorchs(kernels: native.NativeKernels) -> None:
    """RoPE in place as the fused forward computes it (to float rounding: PyTorch's addcmul may
    fuse its multiply-add), and each token's key and value stored where the decode kernel reads them."""
    torch.manual_seed(3)
    tokens, heads, kv_heads, dim, block_size = 5, 6, 2, 32, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(tokens, dim), torch.randn(tokens, dim)
    blocks, offsets = torch.tensor([3, 3, 0, 7, 3]), torch.tensor([0, 1, 15, 4, 2])
    cache = torch.zeros(8, kv_heads, 2, block_size, dim)
    qk = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    rotated = torch.addcmul(qk * cos[:, None], qk.roll(dim // 2, -1), sin[:, None])
    values = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim).clone()
    kernels.rope_store_kv(qkv, heads, kv_heads, cos, sin, cache, blocks, offsets)
    new = qkv[:, : (heads + kv_heads) * dim].view(tokens, heads + kv_heads, dim)
    torch.testing.assert_close(new, rotated, atol=1e-6, rtol=1e-6)
    stored_keys = native.keys_in_order(cache[:, :, 0])
    for t in range(tokens):
        assert torch.equal(stored_keys[blocks[t], :, offsets[t]], new[t, heads:])
        assert torch.equal(cache[blocks[t], :, 1, offsets[t]], values[t])


@pytest.mark.parametrize(("out_features", "in_features"), [(37, 22), (960, 576), (64, 1536)])
def test_native_int8_linear_gives_pytorchs_numbers_bit_for_bit(
    kernels: native.NativeKernels, out_features: int, in_features: int
) -> None:
    if not kernels.int8:  # then the engine uses torch._int_mm, and there is nothing here to test
        pytest.skip("this CPU has no AVX-512 VNNI, which the native int8 matmul needs")
    torch.manual_seed(out_features)
    weight, scale = quantize_weight(torch.randn(out_features, in_features))
    bias = torch.randn(out_features)
    for with_bias in (True, False):
        packed = native.PackedInt8Weight.pack(weight, scale, bias if with_bias else None)
        for rows in (1, 2, 3, 4, 5, 7, 8, 16, 17):
            x = torch.randn(rows, in_features) * 3
            x[0, 0] = 200.0  # an outlier row
            expected = int8_linear(x, weight, scale, bias if with_bias else None)
            assert torch.equal(kernels.int8_linear(kernels.quantize(x), packed), expected)
            residual = torch.randn(rows, out_features)
            total = residual.clone()
            kernels.int8_linear(kernels.quantize(x), packed, out=total)
            assert torch.equal(total, residual + expected)


def test_native_norm_and_activation_quantize_what_pytorch_computes(kernels: native.NativeKernels) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 576) * 2
    weight = torch.rand(576) + 0.5
    for rows, reference in (
        (kernels.rms_norm_quantize(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5)),
        (kernels.silu_mul_quantize(torch.cat([x, x.flip(0)], dim=1)), F.silu(x) * x.flip(0)),
        (kernels.quantize(x), x),
    ):
        values = (rows.data[:, :576].float() - 128) * rows.scales[:, None]
        step = reference.abs().amax(dim=1, keepdim=True) / 127
        torch.testing.assert_close(rows.scales, step[:, 0], rtol=1e-5, atol=0)
        # Within one quantization step of the float result (half a step plus float rounding).
        assert ((values - reference).abs() <= 0.5001 * step + 1e-6).all()


@pytest.fixture(scope="module")
def own_model() -> tuple[Any, Any]:
    return load_model(quantized=False)  # float32, its own copy: int8 swaps layers in place


def test_the_engines_int8_step_with_native_kernels_is_as_good_as_pytorchs(
    own_model: tuple[Any, Any], kernels: native.NativeKernels
) -> None:
    """Every native kernel in the fused int8 forward (norm + quantization, matmul, residual adds,
    attention) against PyTorch's operators, scored on float32's own greedy replies: the same
    likelihood and the same share of float32's tokens, within int8's noise. (Not the same logits:
    sums in another order move an activation across an int8 rounding boundary now and then, and
    that moves logits as much as int8 itself does.)"""
    model, tokenizer = own_model
    prompts = [chat(tokenizer, p) for p in PROMPTS]
    replies = greedy_replies(model, prompts)
    restore = quantize_linears_int8(model)
    try:
        scores = {
            mode: teacher_forced(model, prompts, replies, fused=True, step_tokens=64, kernels=mode)
            for mode in ("torch", "native")
        }
    finally:
        restore()
    nll, agreed = {}, {}
    for mode, logits in scores.items():
        targets = [torch.tensor(r) for r in replies]
        nll[mode] = float(torch.cat([
            -rows.log_softmax(-1).gather(1, t[:, None])[:, 0] for rows, t in zip(logits, targets)
        ]).mean())
        agreed[mode] = sum(int((rows.argmax(-1) == t).sum()) for rows, t in zip(logits, targets)) / sum(map(len, replies))
    print("mean NLL of float32's replies:", nll, "share of float32's tokens:", agreed)
    assert abs(nll["native"] - nll["torch"]) < 0.05, nll
    assert agreed["native"] >= 0.85 and agreed["native"] >= agreed["torch"] - 0.05, agreed


def test_kernels_mode_is_validated_and_torch_means_none() -> None:
    assert native.load("torch") is None
    with pytest.raises(ValueError, match="kernels must be one of"):
        native.load("fast")


def test_without_a_working_compiler_auto_falls_back_and_native_refuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="chatstream.engine.ops.native"):
        assert native.load("auto") is None
    assert "using PyTorch's operators" in caplog.text
    with pytest.raises(native.NativeKernelError, match="native kernels unavailable"):
        native.load("native")
    assert not list(tmp_path.rglob("*.so"))


def test_an_engine_that_cannot_have_its_kernels_leaves_the_model_as_it_was(
    own_model: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    model, tokenizer = own_model
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("CHATSTREAM_CACHE_DIR", str(tmp_path))
    with pytest.raises(native.NativeKernelError):
        LLMEngine(model, tokenizer, max_num_seqs=2, kv_cache_memory_bytes=8 << 20, quantization="int8", kernels="native")
    assert not any(isinstance(m, Int8Linear) for m in model.modules())  # the int8 swap was undone
    assert model.config._attn_implementation != attention.ATTENTION_NAME


def test_native_kernels_are_refused_where_they_do_not_apply(kernels: native.NativeKernels) -> None:
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=64)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 models on CPU"):
        ModelRunner(tiny, BlockManager(4, 16, enable_prefix_caching=False), kernels="native")
    many_heads = LlamaForCausalLM(LlamaConfig(hidden_size=288, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=72, vocab_size=64))  # past the kernel's 64
    with pytest.raises(ValueError, match="at most 64 attention heads"):
        ModelRunner(many_heads, BlockManager(4, 16, enable_prefix_caching=False), kernels="native")
    runner = ModelRunner(many_heads, BlockManager(4, 16, enable_prefix_caching=False), kernels="auto")
    assert runner.native is None and runner.fused is not None  # PyTorch's operators instead
    runner.close()
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=64))
    with pytest.raises(ValueError, match="Llama-family"):
        ModelRunner(gpt2, BlockManager(4, 16, enable_prefix_caching=False), kernels="native")
