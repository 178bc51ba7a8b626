"""The block-quantized matmul (``quant/kernels.c``), built and loaded like :mod:`..ops.native`'s kernels.

:class:`QuantKernels` quantizes float32 activation rows per block of 32 and multiplies them by a
:class:`~.formats.BlockWeight`. The library is compiled with ``-march=native``, so the variant
(AVX-512 VNNI, AVX2, plain C) follows the CPU it runs on; ``isa`` names it. A start-up check
compares it with the float product of the same blocks; where it cannot be built or disagrees,
:func:`load` returns None and the layers dequantize with PyTorch instead (correct, slower).
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..ops import native
from .formats import BlockWeight, TiledWeight, requantize_q8

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
ISA_NAMES = {2: "avx512-vnni", 1: "avx2", 0: "c"}
_P, _I = ctypes.c_void_p, ctypes.c_int64


class QuantKernelError(RuntimeError):
    """The quantized kernels could not be built, loaded or verified here."""


@dataclass
class BlockRows:
    """Activation rows quantized per block of 32: int8 ``q`` ``[rows, k]``, float32 scales ``d`` and
    scaled block sums ``s`` ``[rows, k / 32]``."""

    q: torch.Tensor
    d: torch.Tensor
    s: torch.Tensor


class QuantKernels:
    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        _C = ctypes.c_int
        lib.quantize_blocks.argtypes = [_P, _I, _I, _I, _P, _P, _P]
        lib.rms_norm_quantize_blocks.argtypes = [_P, _I, _I, _P, ctypes.c_float, _P, _P, _P, _P]
        lib.silu_mul_quantize_blocks.argtypes = [_P, _I, _I, _P, _P, _P, _P]
        lib.quant_linear.argtypes = [_C, _P, _P, _P, _I, _I, _P, _P, _P, _I, _P, _P, _I, _C, _C]
        lib.quant_linear.restype = _C
        lib.quant_isa.restype = _C
        self._lib = lib
        self.isa = ISA_NAMES[lib.quant_isa()]
        # One thread pool for the process: kernels.c's, where it loads (else this library's own).
        shared = native.load("auto")
        lib.quant_use_pool.argtypes = [_P]
        lib.quant_use_pool(None if shared is None else shared.pool_run)
        lib.quant_own_pool_threads.restype = ctypes.c_int64

    def own_pool_threads(self) -> int:
        """Helper threads this library's own pool started: 0 while it runs on kernels.c's (one pool)."""
        return int(self._lib.quant_own_pool_threads())

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantKernels:
        return self  # a loaded library: copies of a model share it

    def quantize(self, x: torch.Tensor) -> BlockRows:
        """float32 ``[rows, k]`` (unit stride within a row, ``k`` a multiple of 32) -> :class:`BlockRows`."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.stride(1) != 1 or x.shape[1] % 32:
            raise ValueError(f"expected float32 rows [rows, k * 32] with unit stride, got {x.dtype} {tuple(x.shape)}")
        rows, k = x.shape
        out = _block_rows(rows, k)
        self._lib.quantize_blocks(x.data_ptr(), rows, k, x.stride(0), out.q.data_ptr(), out.d.data_ptr(),
                                  out.s.data_ptr())
        return out

    def rms_norm_quantize(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> BlockRows:
        """``quantize(rms_norm(x) * weight)`` in one call, for contiguous float32 rows ``[rows, k]``."""
        if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous() or x.shape[1] % 32:
            raise ValueError(f"expected contiguous float32 rows [rows, k * 32], got {x.dtype} {tuple(x.shape)}")
        if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.numel() != x.shape[1]:
            raise ValueError("the norm weight must be contiguous float32 of the rows' width")
        rows, k = x.shape
        out, work = _block_rows(rows, k), torch.empty(k)
        self._lib.rms_norm_quantize_blocks(x.data_ptr(), rows, k, weight.data_ptr(), eps, work.data_ptr(),
                                           out.q.data_ptr(), out.d.data_ptr(), out.s.data_ptr())
        return out

    def silu_mul_quantize(self, gate_up: torch.Tensor) -> BlockRows:
        """``quantize(silu(gate) * up)`` for contiguous float32 rows ``[gate | up]`` ``[rows, 2 k]``."""
        if gate_up.dim() != 2 or gate_up.dtype != torch.float32 or not gate_up.is_contiguous() or gate_up.shape[1] % 64:
            raise ValueError(f"expected contiguous float32 rows [rows, 2 * k * 32], got {gate_up.dtype} "
                             f"{tuple(gate_up.shape)}")
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out, work = _block_rows(rows, width), torch.empty(width)
        self._lib.silu_mul_quantize_blocks(gate_up.data_ptr(), rows, width, work.data_ptr(), out.q.data_ptr(),
                                           out.d.data_ptr(), out.s.data_ptr())
        return out

    def linear(self, rows: BlockRows, weight: TiledWeight, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
        """``rows @ weight.T (+ bias)`` as float32 ``[rows, out_features]``, written into ``out`` (a
        view with unit column stride, e.g. a slice of a wider output) or added to it (``accumulate``)."""
        n_rows, k = rows.q.shape
        if k != weight.in_features:
            raise ValueError(f"rows of {k} values for a weight of {weight.in_features}")
        if out is None:
            out = torch.empty((n_rows, weight.out_features), dtype=torch.float32)
        elif out.shape != (n_rows, weight.out_features) or out.dtype != torch.float32 or out.stride(1) != 1:
            raise ValueError(f"out must be float32 {(n_rows, weight.out_features)} with unit column stride")
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            raise ValueError("bias must be contiguous float32")
        status = self._lib.quant_linear(
            weight.kind, rows.q.data_ptr(), rows.d.data_ptr(), rows.s.data_ptr(), n_rows, k,
            weight.qs.data_ptr(), weight.d.data_ptr(), None if weight.m is None else weight.m.data_ptr(),
            weight.out_features, None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0),
            int(accumulate), torch.get_num_threads(),
        )
        if status == -2:
            raise MemoryError(f"no memory for {n_rows} activation rows of {k}")
        if status != 0:
            raise ValueError(f"the quantized kernel takes kind 4, 5, 6 or 8 and whole blocks, not kind {weight.kind}, k {k}")
        return out


FLAGS = ("-pthread",)  # its own helper threads (see "threads" in kernels.c)


def _block_rows(rows: int, k: int) -> BlockRows:
    return BlockRows(torch.empty((rows, k), dtype=torch.int8), torch.empty((rows, k // 32)), torch.empty((rows, k // 32)))


def build(extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``quant/kernels.c`` (cached like ``kernels.c``); ``("-mno-avx512f",)`` builds the AVX2 variant."""
    return native.build(SOURCE, (*FLAGS, *extra_flags))


_loaded: dict[Path, QuantKernels | None] = {}


def load(extra_flags: tuple[str, ...] = ()) -> QuantKernels | None:
    """The checked kernels, or None (logged) where they cannot be built or fail their check."""
    try:
        path = build(extra_flags)
    except (native.NativeKernelError, OSError) as exc:
        logger.warning("quantized kernels unavailable, dequantizing with PyTorch instead: %s", exc)
        return None
    if path not in _loaded:
        try:
            kernels = QuantKernels(path)
            check(kernels)
            _loaded[path] = kernels
        except (QuantKernelError, OSError) as exc:
            logger.warning("quantized kernels unavailable, dequantizing with PyTorch instead: %s", exc)
            _loaded[path] = None
    return _loaded[path]


def check(kernels: QuantKernels) -> None:
    """Every kind against the float product of the same quantized values (odd rows and channels)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 256, generator=generator)
    rows = kernels.quantize(x)
    x_blocks = (rows.q.float().view(5, 8, 32) * rows.d[..., None]).view(5, 256)
    weight8 = requantize_q8(torch.randn(7, 256, generator=generator).numpy(), "check")
    nibbles = torch.randint(0, 256, (7, 128), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(7, 8, generator=generator) / 8).half()
    weight4 = BlockWeight(4, nibbles, scales, (-8 * scales.float()).half(), 7, 256, "check")
    sub_scales = torch.randint(-128, 128, (7, 16), generator=generator, dtype=torch.int8)
    high = torch.randint(0, 256, (7, 64), generator=generator, dtype=torch.uint8)
    weight6 = BlockWeight(6, nibbles, sub_scales, (torch.rand(7, 1, generator=generator) / 512).half(), 7, 256,
                          "check", high)
    sub_mins = torch.randint(0, 64, (7, 16), generator=generator, dtype=torch.uint8)
    weight5 = BlockWeight(5, nibbles, sub_mins, (torch.rand(7, 2, generator=generator) / 256).half(), 7, 256, "check")
    for weight in map(TiledWeight.from_blocks, (weight8, weight4, weight5, weight6)):
        expected = x_blocks @ weight.values().T
        if not torch.allclose(kernels.linear(rows, weight), expected, rtol=1e-4, atol=1e-4):
            raise QuantKernelError(f"{kernels.path} disagrees with PyTorch on its kind-{weight.kind} check")
