"""GGUF weight formats computed as stored: the block layout against the ``gguf`` package's own
dequantize, and the native kernels (AVX-512 VNNI and AVX2 builds) against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from chatstream.engine.quant import native as quant_native
from chatstream.engine.quant.formats import BlockWeight, TiledWeight, from_gguf

OUT, IN = 37, 512  # odd channel count: a partial tile of 4; two Q4_K/Q6_K super-blocks per row
# bytes per block, values per block, where its fp16 scale fields are
LAYOUTS = {
    "Q8_0": (34, 32, [0]),
    "Q4_0": (18, 32, [0]),
    "Q4_1": (20, 32, [0, 2]),
    "Q4_K": (144, 256, [0, 2]),
    "Q6_K": (210, 256, [208]),
    "Q5_K": (176, 256, [0, 2]),
}


def random_tensor(type_name: str, seed: int = 0) -> np.ndarray:
    """Random blocks of ``type_name`` (every bit pattern is a valid block but for the fp16 scales,
    which get small positive values): ``[OUT, bytes per row]`` as a GGUF file stores them."""
    size, values, scale_at = LAYOUTS[type_name]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (OUT * IN // values, size), dtype=np.uint8)
    for at in scale_at:
        blocks[:, at : at + 2] = (rng.random((len(blocks), 1)) * 0.02 + 0.001).astype(np.float16).view(np.uint8)
    return blocks.reshape(OUT, -1)


def reference(raw: np.ndarray, type_name: str) -> torch.Tensor:
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(OUT, IN).copy())


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_stored_block_formats_keep_the_files_values_exactly(type_name: str) -> None:
    raw = random_tensor(type_name)
    weight = from_gguf(raw, type_name, (OUT, IN))
    assert torch.equal(weight.values(), reference(raw, type_name))
    assert weight.nbytes == raw.nbytes + (OUT * IN // 32 * 2 if type_name == "Q4_0" else 0)  # Q4_0 gains m


def test_q4_k_keeps_the_files_values_exactly_with_its_integer_scales() -> None:
    raw = random_tensor("Q4_K")
    weight = from_gguf(raw, "Q4_K", (OUT, IN))
    # the file's 12 bytes of 6-bit scales and mins a super-block become 16 bytes
    assert weight.kind == 5 and weight.nbytes == raw.nbytes + OUT * IN // 256 * 4
    assert torch.equal(weight.values(), reference(raw, "Q4_K"))


def test_q6_k_keeps_the_files_values_exactly_in_the_files_bytes() -> None:
    raw = random_tensor("Q6_K")
    weight = from_gguf(raw, "Q6_K", (OUT, IN))
    assert weight.kind == 6 and weight.nbytes == raw.nbytes
    assert torch.equal(weight.values(), reference(raw, "Q6_K"))


def test_other_types_are_requantized_to_8_bits_within_half_a_step() -> None:
    raw = random_tensor("Q5_K")
    weight = from_gguf(raw, "Q5_K", (OUT, IN))
    expected = reference(raw, "Q5_K")
    assert weight.kind == 8 and weight.source == "Q5_K"
    step = expected.view(OUT, -1, 32).abs().amax(dim=-1, keepdim=True) / 127
    error = (weight.values().view(OUT, -1, 32) - expected.view(OUT, -1, 32)).abs()
    assert (error <= 0.5 * step * 1.01 + 1e-6).all()


@pytest.mark.parametrize("type_name", list(LAYOUTS))
def test_tiled_layout_keeps_every_value_and_row_lookup(type_name: str) -> None:
    blocks = from_gguf(random_tensor(type_name), type_name, (OUT, IN))
    tiled = TiledWeight.from_blocks(blocks)
    assert torch.equal(tiled.values(), blocks.values())
    rows = torch.tensor([36, 0, 17, 17])
    assert torch.equal(tiled.values(rows), blocks.values()[rows])
    assert tiled.nbytes == blocks.nbytes * 48 // OUT  # only padding to 16 channels (37 -> 48 here)


ISA_BUILDS = {"native": (), "avx2": ("-mno-avx512f",), "c": ("-mno-avx512f", "-mno-avx2", "-mno-f16c")}


@pytest.fixture(scope="module", params=list(ISA_BUILDS))
def kernels(request: pytest.FixtureRequest) -> quant_native.QuantKernels:
    loaded = quant_native.load(ISA_BUILDS[request.param])
    assert loaded is not None, "the quantized kernels must build and pass their check here"
    if request.param != "native":
        assert loaded.isa == request.param
    return loaded


@pytest.mark.parametrize("type_name", list(LAYOUTS))
def test_kernel_multiplies_each_format_as_pytorch_does(kernels: quant_native.QuantKernels, type_name: str) -> None:
    raw = random_tensor(type_name, seed=1)
    weight = TiledWeight.from_blocks(from_gguf(raw, type_name, (OUT, IN)))
    x = torch.randn(6, IN, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(OUT)
    rows = kernels.quantize(x)
    got = kernels.linear(rows, weight, bias)
    # The same quantized activations times the same weights, in float32: equal but for summation order.
    x_blocks = (rows.q.float().view(6, -1, 32) * rows.d[..., None]).view(6, IN)
    assert torch.allclose(got, x_blocks @ weight.values().T + bias, rtol=1e-4, atol=1e-4)
    # Against the file's own values and unquantized activations: within int8 activation error.
    exact = x @ reference(raw, type_name).T + bias
    assert ((got - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.parametrize("type_name", ["Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_kernel_splits_wide_products_across_threads_and_row_chunks(kernels: quant_native.QuantKernels,
                                                                   type_name: str) -> None:
    """27 rows (chunks of 16, 8, 2 and 1 over each unpacked block) times 16 tiles of channels, large
    enough to be shared between threads: the same numbers on one thread and on two."""
    wide = 8
    raw = np.concatenate([random_tensor(type_name, seed) for seed in range(wide)])  # [37 * 8, bytes]
    weight = TiledWeight.from_blocks(from_gguf(raw, type_name, (OUT * wide, IN)))
    rows = kernels.quantize(torch.randn(27, IN, generator=torch.Generator().manual_seed(3)))
    x_blocks = (rows.q.float().view(27, -1, 32) * rows.d[..., None]).view(27, IN)
    expected = x_blocks @ weight.values().T
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2, 2):
            torch.set_num_threads(threads)
            results.append(kernels.linear(rows, weight))
    finally:
        torch.set_num_threads(previous)
    # float32 sums of large terms (Q6_K's random blocks reach ~1e3): a near-zero sum keeps their rounding
    assert torch.allclose(results[0], expected, rtol=1e-4, atol=1e-4 + 1e-6 * expected.abs().max().item())
    assert all(torch.equal(r, results[0]) for r in results[1:])  # each channel summed in the same order


def test_norm_or_silu_and_quantize_in_one_call_quantize_what_pytorch_computes(kernels: quant_native.QuantKernels) -> None:
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(4)) * 3
    norm = torch.rand(IN) + 0.5
    fused = kernels.rms_norm_quantize(x, norm, 1e-5)
    separate = kernels.quantize(torch.nn.functional.rms_norm(x, (IN,), norm, 1e-5))
    assert torch.allclose(fused.d, separate.d, rtol=1e-5)
    assert (fused.q.int() - separate.q.int()).abs().max() <= 1  # summation order may flip a rounding
    with pytest.raises(ValueError, match="norm weight"):
        kernels.rms_norm_quantize(x, norm[:32], 1e-5)
    gate_up = torch.cat([x, x.flip(0)], dim=1)
    fused = kernels.silu_mul_quantize(gate_up)
    separate = kernels.quantize(torch.nn.functional.silu(x) * x.flip(0))
    assert torch.allclose(fused.d, separate.d, rtol=1e-5)
    assert (fused.q.int() - separate.q.int()).abs().max() <= 1


def test_kernel_writes_into_slices_and_accumulates(kernels: quant_native.QuantKernels) -> None:
    weight = TiledWeight.from_blocks(from_gguf(random_tensor("Q4_1"), "Q4_1", (OUT, IN)))
    rows = kernels.quantize(torch.randn(3, IN))
    alone = kernels.linear(rows, weight)
    wide = torch.zeros(3, OUT + 5)
    kernels.linear(rows, weight, out=wide[:, 5:])
    assert torch.equal(wide[:, 5:], alone) and torch.equal(wide[:, :5], torch.zeros(3, 5))
    base = torch.randn(3, OUT)
    assert torch.allclose(kernels.linear(rows, weight, out=base.clone(), accumulate=True), base + alone)


def test_bad_inputs_are_refused_with_the_reason(kernels: quant_native.QuantKernels) -> None:
    with pytest.raises(ValueError, match="whole blocks of 32"):
        from_gguf(np.zeros((2, 34), dtype=np.uint8), "Q8_0", (2, 30))
    with pytest.raises(ValueError, match="rows"):
        kernels.quantize(torch.randn(2, 33))
    weight = TiledWeight.from_blocks(
        BlockWeight(8, torch.zeros(2, 64, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.float16), None, 2, 64))
    with pytest.raises(ValueError, match="64"):
        kernels.linear(kernels.quantize(torch.randn(1, 32)), weight)
